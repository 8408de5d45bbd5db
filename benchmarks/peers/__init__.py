"""The `peers` benchmark stage: fasttin's loaders against FFCV, DALI's own idiom, torchvision and
the classic pipeline, loader only, on the CPU. `run_peers` (benchmarks.peers.runner) is the stage;
`python -m benchmarks.peers` runs it alone; setup-ffcv.sh installs FFCV beside the main venv."""
from benchmarks.peers.runner import run_peers

__all__ = ["run_peers"]
