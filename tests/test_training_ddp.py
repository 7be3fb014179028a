"""`torchrun --nproc_per_node 2` runs the same recipe with DDP on CPU (gloo): both ranks end with identical weights,
equal to one process training on the same global batch."""
import json
import os
import subprocess
import sys

import torch

from layerskip_ext.training.config import load_config
from layerskip_ext.training.trainer import train

from test_training_recipes import tiny_overrides

WORKER = """
import json, os, sys, torch
from layerskip_ext.training.config import load_config
from layerskip_ext.training.trainer import train
result = train(load_config(None, json.loads(sys.argv[1])), progress=False)
torch.save(result["model"].state_dict(), os.path.join(sys.argv[2], f"rank{result['rank']}.pt"))
"""


def test_ddp_two_processes_match_one_process(tmp_path):
    dropout = ["layer_dropout.p_max=0.9", 'layer_dropout.time_schedule="linear"']  # rates 0, .3, .6 x depth
    overrides = tiny_overrides(tmp_path, out="ddp", steps=3, extra=["train.batch_size=2", *dropout])
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), json.dumps(overrides), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # one process with the global batch (2 x 2) draws the same samples and the same layer-dropout masks
    single = train(load_config(None, tiny_overrides(tmp_path, out="one", steps=3, extra=["train.batch_size=4", *dropout])),
                   progress=False)["model"].state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)
    assert os.path.isfile(tmp_path / "ddp" / "final" / "model.safetensors")
