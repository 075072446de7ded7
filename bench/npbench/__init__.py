"""Pieces of the tunnel benchmark (``bench/tunnel_bench.py``).

* ``target``   - the echo / sink / UDP echo servers the tunnels forward to;
* ``load``     - the load generators (round trips, connection rate, bursts,
  throughput through iperf3 or a built-in sink);
* ``procs``    - the implementations under test, their processes, and facts
  about the machine;
* ``scenario`` - which tunnel set-ups a run measures;
* ``report``   - medians, ratios, the Markdown tables and the JSON file.

Only the standard library and psutil are used, so the benchmark runs from the
project's virtual environment without extra packages.
"""
