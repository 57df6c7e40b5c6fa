"""``python -m quantbench`` (and ``torchrun ... -m quantbench train ...``): the command line."""

from quantbench.cli import main

if __name__ == "__main__":
    main()
