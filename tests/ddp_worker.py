"""Run by the DDP test under `accelerate launch`: train from a config, save this rank's final weights."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from semroute.config import load_config
from semroute.train import train

config_path, out = Path(sys.argv[1]), Path(sys.argv[2])
result = train(load_config(config_path), out, progress=False)
rank = int(os.environ.get("RANK", 0))  # the process group is gone once training ends
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, out / f"rank{rank}.safetensors")
