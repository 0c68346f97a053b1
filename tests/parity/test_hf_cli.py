"""``moe-lightning import-hf`` and ``export-hf``: a transformers checkpoint in, generated tokens and a checkpoint out;
mistakes end with one error line and write nothing."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from moe_lightning.cli import main  # noqa: E402
from tests.parity.hf_tiny import save, tiny_hf_model  # noqa: E402

PROMPT = [5, 17, 200, 33, 90]


@torch.no_grad()
def test_import_generate_and_export_round_trip(tmp_path, capsys):
    hf = tiny_hf_model("qwen2_moe")
    source = save(hf, tmp_path / "hf")
    ours = tmp_path / "model.safetensors"
    main(["import-hf", str(source), str(ours)])
    assert "qwen2_moe" in capsys.readouterr().out

    main(["generate", str(ours), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6"])
    printed = capsys.readouterr().out.strip()
    prompt = torch.tensor([PROMPT])
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert printed == str(theirs)

    main(["export-hf", str(ours), str(tmp_path / "exported")])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(reloaded(prompt).logits, hf(prompt).logits, rtol=1e-5, atol=1e-5)


def test_import_of_a_bad_directory_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    with pytest.raises(SystemExit):
        main(["import-hf", str(tmp_path), str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path} has no config.json" in error and error.startswith("moe-lightning import-hf: error:")
    assert not out.exists()


def test_export_to_a_family_the_model_does_not_fit_writes_nothing(tmp_path, capsys):
    ours = tmp_path / "model.safetensors"
    main(["import-hf", str(save(tiny_hf_model("qwen3_moe"), tmp_path / "hf")), str(ours)])
    with pytest.raises(SystemExit):
        main(["export-hf", str(ours), str(tmp_path / "out"), "--family", "mixtral"])
    assert "does not fit mixtral's architecture" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
