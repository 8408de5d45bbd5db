"""The peers of the benchmark table: fasttin's loaders against FFCV, DALI's own idiom, torchvision
and the classic pipeline, loader only, on the CPU (`python -m benchmarks.run --stages peers`).
stage.py is the table's row, worker.py the process each peer runs in, loaders.py one builder a
peer, mae.py the error against PIL bicubic; setup-ffcv.sh installs FFCV beside the main venv."""
