"""The API package must import (and generate the CRD) with torch, transformers and kopf absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers", "kopf", "peft", "bitsandbytes", "torchao", "kubernetes")


def test_api_imports_without_heavy_dependencies() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        import finetune_api, finetune_api.crd, finetune_api.gpu
        from finetune_api import TrainingHyperparams, FineTuneJob
        TrainingHyperparams()
        finetune_api.crd.render_crd()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        try:
            finetune_api.QuantizationScheme.FP8.to_transformers_config()
        except ImportError as exc:
            print("lazy:", exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "lazy: blocked for this test: transformers" in result.stdout
