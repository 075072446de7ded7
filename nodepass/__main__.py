"""``python -m nodepass URL``: same as the ``nodepass`` command."""

from nodepass.cli import entry

if __name__ == "__main__":
    entry()
