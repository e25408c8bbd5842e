"""The trainer never imports kopf or the kubernetes client; its entry module loads torch only once
training starts."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False
    )


def test_trainer_main_does_not_load_kopf_or_the_kubernetes_client() -> None:
    result = run(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("kopf", "kubernetes"):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        import finetune_trainer.main
        import finetune_trainer.pipeline  # everything training needs
        import finetune_trainer.report
        assert "kopf" not in sys.modules and "kubernetes" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_entry_module_is_light_so_bad_job_files_fail_fast() -> None:
    result = run(
        """
        import sys
        import finetune_trainer.main
        heavy = sorted(m for m in ("torch", "transformers", "peft", "kopf") if m in sys.modules)
        print(heavy)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
