"""--data.tokenizer_from with existing tokenizers: tokenizer.json, a Hugging Face folder, GPT-2's encoder.json +
vocab.bpe; the model's vocabulary rounded up to 64, and the padding ids never sampled."""

import json

import numpy as np
import pytest
import torch

from picogpt_lightning import encoding as encoding_module
from picogpt_lightning import tokenizer_source
from picogpt_lightning.cli import main
from picogpt_lightning.data import GPTDataModule
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.generate import generate
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.prepare import cached_prepare, prepare
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import ENDOFTEXT, BPETokenizer
from picogpt_lightning.tokenizer_source import model_vocab_size, tokenizer_from_path

from helpers import make_config, make_text
from test_finetune import make_conversations

tokenizers = pytest.importorskip("tokenizers", reason="these tokenizers are Hugging Face `tokenizers` ones")


def train_tokenizer(text: str, vocab_size: int, special: list[str]) -> "tokenizers.Tokenizer":
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                             initial_alphabet=byte_level.alphabet())
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def write_gpt2_files(tokenizer, folder):
    """GPT-2's two release files for this tokenizer: encoder.json (token -> id) and vocab.bpe (merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = json.loads(tokenizer.to_str())["model"]
    (folder / "encoder.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    text = make_text(root / "text.txt", sentences=300)
    tokenizer = train_tokenizer(text.read_text(encoding="utf-8"), 300, [ENDOFTEXT])
    tokenizer.save(str(root / "tokenizer.json"))
    hf = root / "hf"
    hf.mkdir()
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": ENDOFTEXT}), encoding="utf-8")
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}), encoding="utf-8")
    write_gpt2_files(tokenizer, root / "gpt2")
    return root, text


def reference_ids(world, source: str) -> list[int]:
    """What `tokenizers` itself gives for the whole text, which ends with end-of-text before its last newline."""
    root, text = world
    whole = text.read_text(encoding="utf-8").rstrip("\n") + ENDOFTEXT + "\n"
    if source.startswith("gpt2"):
        reference = tokenizers.ByteLevelBPETokenizer(str(root / "gpt2" / "encoder.json"),
                                                     str(root / "gpt2" / "vocab.bpe"))
        reference.add_special_tokens([ENDOFTEXT])
    else:
        reference = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    return reference.encode(whole).ids


SOURCES = {"tokenizer.json": "tokenizer.json", "hf folder": "hf", "gpt2 folder": "gpt2",
           "gpt2 encoder.json": "gpt2/encoder.json", "gpt2 vocab.bpe": "gpt2/vocab.bpe"}


@pytest.mark.parametrize("source", SOURCES)
def test_text_encoded_with_a_given_tokenizer_has_the_ids_tokenizers_gives(world, tmp_path, source):
    root, text = world
    meta = prepare(str(text), str(tmp_path / "out"), tokenizer_from=str(root / SOURCES[source]))
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=meta["dtype"]) for split in
                          ("train", "val")]).tolist()
    assert ids == reference_ids(world, source.replace(" ", ""))
    assert meta["vocab_size"] == 300 and meta["backend"] == "bpe"


def test_gpt2_files_load_as_the_same_tokenizer_as_its_tokenizer_json(world):
    root, _ = world
    gpt2 = tokenizer_from_path(root / "gpt2")
    assert gpt2.vocab_size == 300 and gpt2.eot_id == tokenizer_from_path(root / "tokenizer.json").eot_id
    sample = "The mind, café  and 🙂<|endoftext|>next\n\n"
    assert gpt2.decode(gpt2.encode(sample)) == sample


def test_the_model_vocabulary_is_the_tokenizers_rounded_up_to_64_for_tokenizer_files_only(world, tmp_path):
    root, text = world
    assert model_vocab_size(50257, str(root / "gpt2")) == 50304  # GPT-2's, as nanoGPT pads it
    assert model_vocab_size(300, str(root / "tokenizer.json")) == 320
    assert model_vocab_size(300, None) == 300  # trained here
    assert model_vocab_size(300, str(tmp_path / "run.ckpt")) == 300  # a checkpoint's: resumes keep their size
    data = GPTDataModule(str(text), tokenizer_from=str(root / "gpt2"), cache_dir=str(tmp_path / "cache"),
                         block_size=8)
    assert (data.tokenizer_vocab_size, data.model_vocab_size) == (300, 320)


def test_fit_on_a_tokenizer_file_trains_a_padded_model_whose_samples_are_tokenizer_ids(world, tmp_path, capsys):
    root, text = world
    config = make_config(tmp_path, text, data={"mode": "token", "tokenizer_from": str(root / "hf"), "block_size": 64},
                         trainer={"max_steps": 2, "val_check_interval": 2})
    assert main(["fit", "--config", str(config), "--sample_tokens", "0"]) == 0
    base = tmp_path / "checkpoints" / "run" / "last.ckpt"
    assert torch.load(base, weights_only=True)["picogpt"]["model_config"]["vocab_size"] == 320
    assert main(["sample", "--ckpt", str(base), "--prompt", "The", "--max_new_tokens", "30", "--temperature", "5",
                 "--top_k", "0", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()
    # Fine-tuning keeps the base model's padded vocabulary.
    assert main(["finetune", "--model.init_from", str(base), "--data.path",
                 str(make_conversations(tmp_path / "chat.jsonl")), "--trainer.max_steps", "1", "--sample_tokens", "0",
                 "--ckpt_dir", str(tmp_path / "chat"), "--trainer.enable_progress_bar", "false",
                 "--data.batch_size", "2"]) == 0
    assert torch.load(tmp_path / "chat" / "last.ckpt", weights_only=True)["picogpt"]["model_config"]["vocab_size"] == 320


def test_generation_never_samples_the_padding_rows_of_a_padded_vocabulary():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight[300:] = 10 * model.lm_head.weight[300:].sign()  # padding rows would win
    greedy = SamplingSettings(temperature=0)
    assert any(token >= 300 for token in generate(model, [1, 2], 10, greedy))  # without the mask they do
    assert all(token < 300 for token in generate(model, [1, 2], 10, greedy, vocab_size=300))
    hot = SamplingSettings(temperature=50.0, top_k=None)
    assert all(token < 300 for token in generate(model, [1], 200, hot, torch.Generator().manual_seed(0),
                                                  vocab_size=300))


def test_the_prepared_cache_is_reused_and_prepared_again_when_the_tokenizer_file_changes(world, tmp_path, capsys):
    root, text = world
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_bytes((root / "tokenizer.json").read_bytes())
    cache = str(tmp_path / "cache")
    first = cached_prepare(str(text), cache, tokenizer_from=str(tokenizer_json))
    written = (first / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cached_prepare(str(text), cache, tokenizer_from=str(tokenizer_json)) == first
    assert (first / "meta.json").stat().st_mtime_ns == written and "preparing" not in capsys.readouterr().out
    train_tokenizer(text.read_text(encoding="utf-8"), 290, [ENDOFTEXT]).save(str(tokenizer_json))
    second = cached_prepare(str(text), cache, tokenizer_from=str(tokenizer_json))
    assert second != first and json.loads((second / "meta.json").read_text())["vocab_size"] == 290


def test_a_tokenizer_without_end_of_text_joins_documents_without_one_and_says_so(world, tmp_path, capsys):
    root, text = world
    train_tokenizer(text.read_text(encoding="utf-8"), 280, []).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first doc\n", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text("second doc\n", encoding="utf-8")
    prepare(str(tmp_path / "docs"), str(tmp_path / "out"), tokenizer_from=str(tmp_path / "tokenizer.json"),
            val_fraction=0.5)
    warning = [line for line in capsys.readouterr().err.splitlines() if "end-of-text" in line]
    assert len(warning) == 1 and "has no end-of-text token: documents are joined without one" in warning[0]
    ids = [np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=np.uint16).tolist() for split in ("train", "val")]
    assert tokenizer_from_path(tmp_path / "tokenizer.json").decode(ids[0] + ids[1]) == "first doc\n\n\nsecond doc\n"


def test_document_ends_are_the_tokenizers_own_end_of_text_and_no_token_is_added_per_chunk(world):
    _, text = world
    library = train_tokenizer(text.read_text(encoding="utf-8"), 280, ["<s>", "</s>"])
    library.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", library.token_to_id("<s>"))])  # like Llama 3: a begin-of-text before every text encoded
    tokenizer = BPETokenizer(library)
    tokenizer.eot_id = library.token_to_id("</s>")  # its end-of-text, as tokenizer_config.json's eos_token says
    ids = list(encoding_module._bpe_ids(tokenizer, ["the mind<|endoftext|>\n\nwise", "is good"]))
    plain = [library.encode(piece, add_special_tokens=False).ids for piece in ("the mind", "\n\nwise", "is good")]
    assert ids == [plain[0] + [tokenizer.eot_id] + plain[1], plain[2]]


def test_a_folder_without_any_tokenizer_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(PicoGPTError, match=r"holds no tokenizer \(tokenizer.json, vocab.json, or GPT-2's encoder"):
        tokenizer_from_path(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(PicoGPTError, match="encoder.json does not exist"):
        tokenizer_from_path(tmp_path / "vocab.bpe")


def test_a_tokenizer_that_marks_the_start_of_every_text_is_said_to_differ_at_chunk_edges(world, tmp_path, capsys):
    _, text = world
    library = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    library.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")  # SentencePiece's way
    library.train_from_iterator([text.read_text(encoding="utf-8")], trainer=tokenizers.trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", ENDOFTEXT], show_progress=False))
    library.save(str(tmp_path / "tokenizer.json"))
    prepare(str(text), str(tmp_path / "out"), tokenizer_from=str(tmp_path / "tokenizer.json"))
    assert "marks the start of every text it encodes" in capsys.readouterr().err
    prepare(str(text), str(tmp_path / "gpt2-like"), tokenizer_from=str(world[0] / "tokenizer.json"))
    assert "warning" not in capsys.readouterr().err


def test_a_run_from_before_the_padding_resumes_with_its_own_vocabulary(world, tmp_path, monkeypatch):
    root, text = world
    config = make_config(tmp_path, text, data={"mode": "token", "tokenizer_from": str(root / "tokenizer.json")},
                         trainer={"max_steps": 2, "val_check_interval": 2})
    with monkeypatch.context() as before:
        before.setattr(tokenizer_source, "VOCAB_MULTIPLE", 1)  # as runs were trained before the padding
        assert main(["fit", "--config", str(config), "--sample_tokens", "0"]) == 0
    last = tmp_path / "checkpoints" / "run" / "last.ckpt"
    assert torch.load(last, weights_only=True)["picogpt"]["model_config"]["vocab_size"] == 300
    assert main(["fit", "--ckpt_path", str(last), "--additional_steps", "1", "--sample_tokens", "0"]) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 and resumed["picogpt"]["model_config"]["vocab_size"] == 300
