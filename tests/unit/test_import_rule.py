"""The design's import rule: the model layers are plain PyTorch. Each check runs in a fresh interpreter, since this
test process has imported Lightning long before."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics",
                      "tensorboard")


def run_fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_model_layers_import_without_lightning():
    # Every module under the five packages, imported one by one; the first to pull in Lightning is named.
    out = run_fresh(f"""
        import importlib, pkgutil, sys
        FORBIDDEN = {LIGHTNING_PACKAGES!r}

        def loaded():
            return sorted({{name.split(".")[0] for name in sys.modules}} & set(FORBIDDEN))

        names = ["moe_lightning.layer"]
        for package in ("routing", "experts", "dispatch", "models"):
            module = importlib.import_module(f"moe_lightning.{{package}}")
            names.append(module.__name__)
            names += [info.name for info in pkgutil.walk_packages(module.__path__, module.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
            assert not loaded(), f"importing {{name}} imported {{loaded()}}"
        print(len(names))
    """)
    assert int(out) > 30  # the walk found the subpackages (models.hf among them), not only the five names


def test_the_package_loads_its_lightning_names_on_first_access():
    run_fresh("""
        import sys
        import moe_lightning
        assert "lightning" not in sys.modules
        assert {"MoELightningModule", "ExpertParallelStrategy"} <= set(dir(moe_lightning))
        for name in moe_lightning.__all__:
            getattr(moe_lightning, name)
        from moe_lightning import MoELightningModule
        from moe_lightning.module import MoELightningModule as direct
        assert MoELightningModule is direct and "lightning" in sys.modules
        from lightning.pytorch.strategies import StrategyRegistry
        assert "expert_parallel" in StrategyRegistry and "expert_parallel_fully_shard" in StrategyRegistry
        try:
            moe_lightning.NoSuchName
        except AttributeError as error:
            assert "NoSuchName" in str(error)
        else:
            raise AssertionError("an unknown attribute did not raise")
    """)


def test_yaml_class_path_resolves_the_lazy_name():
    # What LightningCLI does with `class_path: moe_lightning.MoELightningModule` in every recipe.
    run_fresh("""
        from jsonargparse import ArgumentParser
        from lightning.pytorch import LightningModule

        parser = ArgumentParser()
        parser.add_subclass_arguments(LightningModule, "model")
        config = parser.parse_string('''
        model:
          class_path: moe_lightning.MoELightningModule
          init_args:
            model:
              class_path: moe_lightning.models.MoETransformer
              init_args:
                config: {vocab_size: 16, dim: 8, num_layers: 1, num_heads: 2, num_experts: 2, expert_hidden_dim: 8}
        ''')
        module = parser.instantiate(config).model
        assert type(module).__name__ == "MoELightningModule", type(module)
    """)
