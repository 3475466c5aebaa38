"""A torchrun worker for tests/test_lm_fsdp.py: several `python -m fasttx train` runs in one launch.

Starting torch in three processes costs most of a 2-rank test on a loaded 2-core machine, so one launch
runs them all, one after another, in one gloo process group created here (train() uses a group that
exists; creating a second one after destroying the first hung in torchrun's store). argv[1] is a
JSON list of steps: ["train", ...flags] runs the command line, ["copy", SRC, DST] copies a run's folder
(rank 0, between runs).
"""
import json
import os
import shutil
import sys

import torch.distributed as dist

from fasttx.__main__ import main

dist.init_process_group("gloo")
for step in json.loads(sys.argv[1]):
    if step[0] == "copy":
        if os.environ.get("RANK", "0") == "0":
            shutil.copytree(step[1], step[2])
        continue
    code = main(step)
    if code:
        sys.exit(code)
dist.destroy_process_group()
# Every run is saved and said: leave without the interpreter's teardown, where gloo's and torchrun's store's
# threads can still be joinable and abort the rank ("terminate called without an active exception", exit -6,
# seen once in a fresh clone's make test on the loaded 2-core machine; fasttx.lm.train._exit_now, for Ctrl-C).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
