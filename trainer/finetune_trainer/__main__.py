"""`python -m finetune_trainer`: the same as the finetune-trainer command (the data-parallel
launcher starts its workers this way)."""

import os
import sys

from finetune_trainer import distributed
from finetune_trainer.main import main

code = main()
if distributed.is_worker():
    # The outcome is delivered and every file closed: skip the interpreter's teardown of torch
    # (seconds of the launcher's wait, and a process-group destructor can hang on NCCL).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
