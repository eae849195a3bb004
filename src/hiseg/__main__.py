"""``python -m hiseg``: the same command line as ``hiseg``."""

from hiseg.cli import app

if __name__ == "__main__":
    app(prog_name="hiseg")
