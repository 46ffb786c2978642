"""A model name that is neither a local checkpoint nor loadable from the hub fails in one clear line."""

from __future__ import annotations

import pytest
from rlhf_hybrid import ModelNotAvailableError, load_causal_lm, load_tokenizer


@pytest.mark.parametrize(("load", "what"), [(load_causal_lm, "model"), (load_tokenizer, "tokenizer of")])
def test_an_unreachable_hub_name_raises_one_line_naming_it(monkeypatch, load, what):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: the name cannot resolve
    name = "rlhf-test-no-such-org/no-such-model"
    with pytest.raises(ModelNotAvailableError) as e:
        load(name)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{what} '{name}' is not a local directory and could not be loaded from the Hugging Face "
                          f"hub: "), msg
    assert msg.endswith("(HF_HUB_OFFLINE is set, so nothing is downloaded: unset it, or download the model first "
                        "with `hf download NAME`)"), msg
    assert isinstance(e.value, FileNotFoundError)  # what callers that handle a missing model already catch


def test_a_local_directory_keeps_its_own_error(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json") as e:
        load_causal_lm(str(tmp_path / "m"))
    assert not isinstance(e.value, ModelNotAvailableError)
