# pytest setup for the msa_torch tests: import the package from this source tree, and a
# report line saying which libmsa_torch is under test.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_report_header(config):
    import torch
    import msa_torch

    return [f"msa_torch: {msa_torch.library_path} (torch {torch.__version__}, "
            f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0})"]
