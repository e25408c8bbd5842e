"""`python -m finetune_trainer`: the same as the finetune-trainer command."""

import sys

from finetune_trainer.main import main

sys.exit(main())
