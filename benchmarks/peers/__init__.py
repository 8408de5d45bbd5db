"""The peers of the benchmark table (`--stages peers`): stage.py the rows and the worker process each
peer runs in, loaders.py one builder a peer, mae.py the error against PIL bicubic; setup-ffcv.sh
installs FFCV beside the main venv."""
