"""``python -m geopose_mlops.cli``: what the MLproject's entry points run."""

from geopose_mlops.cli import main

if __name__ == "__main__":
    main()
