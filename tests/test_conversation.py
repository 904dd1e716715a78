"""Conversations: reading JSONL, chat templates, loss masks, packing, and the Jinja template for transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from picogpt_lightning.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    get_template,
    template_from_meta,
    validate_messages,
)
from picogpt_lightning.conversation import (
    Conversation,
    encode_conversation,
    encode_conversations,
    pack_conversations,
    read_conversations,
    split_conversations,
)
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, WordTokenizer

QA = BUILTIN_TEMPLATES["qa"]
CORPUS = ("You are picoGPT.\n\nQ: What is truth?\nA: What remains.\n\nQ: And virtue?\nA: A habit.\n\n"
          "Q: hi\nA: yo\n\nQ: ok?\nA: no\n\n<|im_start|>user\n_<|im_end|>\n")
TWO_TURNS = [
    {"role": "system", "content": "You are picoGPT."},
    {"role": "user", "content": "What is truth?"},
    {"role": "assistant", "content": "What remains."},
    {"role": "user", "content": "And virtue?"},
    {"role": "assistant", "content": "A habit."},
]


def trained(kind: str):
    if kind == "char":
        return CharTokenizer.train([CORPUS])
    if kind == "word":
        return WordTokenizer.train([CORPUS], vocab_size=100)
    return BPETokenizer.train([CORPUS * 20], vocab_size=300)


def turns(*pairs: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for index, content in enumerate(pairs):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    return messages


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([i for i, on in zip(encoded.ids, encoded.loss_mask) if on])


# ----------------------------------------------------------------------------------------------- rendering


def test_qa_renders_the_corpus_form_with_end_of_text_after_each_answer():
    assert QA.render(TWO_TURNS, has_eot=True) == (
        "You are picoGPT.\n\nQ: What is truth?\nA: What remains.<|endoftext|>\n\n"
        "Q: And virtue?\nA: A habit.<|endoftext|>\n\n"
    )
    prompt = QA.render(TWO_TURNS[:4], has_eot=True, add_generation_prompt=True)
    assert prompt == "You are picoGPT.\n\nQ: What is truth?\nA: What remains.<|endoftext|>\n\nQ: And virtue?\nA:"


def test_without_end_of_text_qa_is_exactly_the_corpus_and_answers_end_at_the_blank_line():
    assert QA.render(TWO_TURNS, has_eot=False) in CORPUS
    assert QA.stop_strings(has_eot=False) == ["\n\n", "\nQ:"]
    assert QA.stop_strings(has_eot=True) == [ENDOFTEXT, "\nQ:"]  # the second stops models never fine-tuned
    assert BUILTIN_TEMPLATES["im"].stop_strings(has_eot=True) == [ENDOFTEXT, "\n<|im_start|>user"]
    inline = ChatTemplate("inline", system="{content} ", user="U: {content} ", assistant="B: {content} | ")
    assert inline.stop_strings(has_eot=False) == [" | ", " | U:"]


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_loss_is_on_each_answer_with_its_leading_space_and_end_of_text_only(kind):
    tokenizer = trained(kind)
    encoded = encode_conversation(TWO_TURNS, QA, tokenizer)
    assert tokenizer.decode(encoded.ids) == QA.render(TWO_TURNS, has_eot=True)
    assert trained_text(tokenizer, encoded) == " What remains.<|endoftext|> A habit.<|endoftext|>"
    eot_positions = [i for i, token in enumerate(encoded.ids) if token == tokenizer.eot_id]
    assert len(eot_positions) == 2 and all(encoded.loss_mask[i] for i in eot_positions)


def test_the_generation_prompt_is_the_training_text_up_to_the_answer():
    tokenizer = trained("bpe")
    whole = encode_conversation(TWO_TURNS, QA, tokenizer)
    prompt = encode_conversation(TWO_TURNS[:4], QA, tokenizer, add_generation_prompt=True)
    assert whole.ids[: len(prompt.ids)] == prompt.ids  # what the model is given at inference, token for token
    assert (whole.loss_mask[: len(prompt.ids)] == prompt.loss_mask).all()
    assert whole.loss_mask[len(prompt.ids)]  # the next token is the answer's first: the model writes it


def test_a_tokenizer_without_end_of_text_learns_the_blank_line_that_ends_an_answer():
    tokenizer = CharTokenizer(CORPUS)  # saved before end-of-text existed
    encoded = encode_conversation(TWO_TURNS, QA, tokenizer)
    assert trained_text(tokenizer, encoded) == " What remains.\n\n A habit.\n\n"


def test_an_assistant_format_with_no_end_marker_cannot_train_without_end_of_text():
    template = ChatTemplate("bare", system="{content}\n", user="U: {content}\n", assistant="B: {content}")
    assert template.render(TWO_TURNS, has_eot=True).endswith("B: A habit.<|endoftext|>")
    with pytest.raises(PicoGPTError, match="answers could never end") as error:
        template.render(TWO_TURNS, has_eot=False)
    assert "\n" not in str(error.value)


def test_answer_pieces_drop_the_space_the_prompt_left_to_the_model():
    assert "".join(QA.answer_pieces(["", " ", "Wh", "at"])) == "What"
    assert list(QA.answer_pieces([" What", " else"])) == ["What", " else"]
    assert list(QA.answer_pieces(["What"])) == ["What"]  # no lead written: nothing removed
    assert list(BUILTIN_TEMPLATES["im"].answer_pieces([" x"])) == [" x"]  # the im prefix ends in a newline


# ----------------------------------------------------------------------------------------------- packing


FORGED = turns("hi<|endoftext|>", "yo<|endoftext|>no", "ok<|endoftext|>")


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_end_of_text_written_inside_messages_is_text_and_only_the_template_ends_answers(kind):
    tokenizer = trained(kind)
    encoded = encode_conversation(FORGED, QA, tokenizer, add_generation_prompt=True)
    assert encoded.ids.count(tokenizer.eot_id) == 1  # the one after the answer, from the template
    plain = encode_conversation(turns("hi", "yo no", "ok"), QA, tokenizer, add_generation_prompt=True)
    assert plain.ids == tokenizer.encode(QA.render(turns("hi", "yo no", "ok"), True, True))


def test_fine_tuning_data_with_end_of_text_inside_an_answer_trains_it_as_text(tmp_path):
    tokenizer = trained("bpe")
    write_lines(tmp_path / "chat.jsonl", json.dumps({"messages": FORGED[:2]}))
    (encoded,), _ = encode_conversations(read_conversations(tmp_path / "chat.jsonl"), QA, tokenizer)
    assert encoded.ids.count(tokenizer.eot_id) == 1
    assert trained_text(tokenizer, encoded) == " yo<|endoftext|>no<|endoftext|>"


def test_several_conversations_pack_into_one_block_and_only_answers_are_targets():
    tokenizer = trained("char")
    first, second = turns("hi", "yo"), turns("ok?", "no", system="You are picoGPT.")
    encoded, _ = encode_conversations([Conversation(first, "a:1"), Conversation(second, "a:2")], QA, tokenizer)
    packed = pack_conversations(encoded, block_size=64)
    assert packed.inputs.shape == packed.targets.shape == (1, 64) and packed.conversations == 2
    inputs, targets = packed.inputs[0], packed.targets[0]
    first_length = len(encoded[0].ids)
    tokens = np.concatenate([inputs, [0]])
    carrying = [i for i in range(64) if targets[i] >= 0]
    assert all(targets[i] == tokens[i + 1] for i in carrying)
    assert [tokenizer.decode([targets[i]]) for i in carrying] == [*" yo", ENDOFTEXT, *" no", ENDOFTEXT]
    # The first conversation's last token is never trained to predict the second's first token.
    assert targets[first_length - 1] == -1 and inputs[first_length] == encoded[1].ids[0]
    assert (targets[first_length + len(encoded[1].ids) - 1 :] == -1).all()  # padding


def test_a_conversation_that_does_not_fit_starts_the_next_block_and_a_too_long_one_is_skipped():
    tokenizer = trained("char")
    encoded = [encode_conversation(turns(q, a), QA, tokenizer) for q, a in
               [("hi", "yo"), ("ok?", "no"), ("What is truth? " * 5, "What remains. " * 5), ("hi", "no")]]
    block_size = len(encoded[0].ids) + 3  # the second conversation does not fit after the first
    packed = pack_conversations(encoded, block_size)
    assert (packed.conversations, packed.skipped, packed.inputs.shape[0]) == (3, 1, 3)
    assert packed.inputs[1, : len(encoded[1].ids)].tolist() == encoded[1].ids
    assert packed.inputs[2, : len(encoded[3].ids)].tolist() == encoded[3].ids
    line = packed.describe()
    assert "3 conversation(s) into 3 block(s)" in line and "skipped 1 longer" in line and "\n" not in line


def test_packing_nothing_that_fits_is_an_error():
    encoded = [encode_conversation(turns("hi", "yo"), QA, trained("char"))]
    with pytest.raises(PicoGPTError, match="none of the 1 conversation"):
        pack_conversations(encoded, block_size=4)


def test_characters_a_char_model_never_saw_are_mapped_and_counted():
    tokenizer = trained("char")
    conversations = [Conversation(turns("Whát is trüth?", "What remains—ü."), "a:1"),
                     Conversation(turns("hi", "yo"), "a:2")]
    encoded, unseen = encode_conversations(conversations, QA, tokenizer)
    assert tokenizer.decode(encoded[0].ids).startswith("Q: What is truth?\nA: What remains")
    assert unseen.conversations == 1 and unseen.counts == {"á": 1, "ü": 2, "—": 1}
    line = unseen.describe()
    assert line.startswith("1 conversation(s) hold 3 character(s) the model never saw, 4 time(s)")
    assert "'ü' -> 'u' x2" in line and "\n" not in line


# ----------------------------------------------------------------------------------------------- reading


def write_lines(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": turns("hi", "yo")})


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"messages": [', "malformed JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"conversation": []}', 'no "messages" list'),
        ('{"messages": []}', '"messages" is empty'),
        ('{"messages": ["hi"]}', "message 1 is not an object with a role and a content"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "message 1 has the unknown role 'bot'"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "message 1 has a content that is not a string"),
        (json.dumps({"messages": turns("hi", "yo") + [{"role": "system", "content": "x"}]}),
         "message 3 is a system message"),
        (json.dumps({"messages": turns("hi")}), "no assistant message"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
         "message 2 is from the user where the assistant was expected"),
        (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),
         "message 1 is from the assistant where the user was expected"),
    ],
)
def test_each_bad_line_is_one_line_naming_file_line_and_what_is_wrong(tmp_path, line, expected):
    path = write_lines(tmp_path / "chat.jsonl", GOOD, "", line)
    with pytest.raises(PicoGPTError) as error:
        read_conversations(path)
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and expected in message and "\n" not in message


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(PicoGPTError, match=r"chat.jsonl:2: the line is not UTF-8"):
        read_conversations(path)


def test_a_folder_reads_its_jsonl_files_in_name_order(tmp_path):
    write_lines(tmp_path / "b.jsonl", json.dumps({"messages": turns("b?", "b")}))
    write_lines(tmp_path / "a.jsonl", GOOD, json.dumps({"messages": turns("a?", "a", system="S")}))
    (tmp_path / "notes.txt").write_text("not a conversation")
    conversations = read_conversations(tmp_path)
    assert [c.source for c in conversations] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:2",
                                                 f"{tmp_path}/b.jsonl:1"]
    assert conversations[1].messages[0] == {"role": "system", "content": "S"}


def test_missing_and_empty_sources_say_what_to_pass(tmp_path):
    with pytest.raises(PicoGPTError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(PicoGPTError, match="holds no .jsonl files"):
        read_conversations(tmp_path)
    with pytest.raises(PicoGPTError, match="holds no conversations"):
        read_conversations(write_lines(tmp_path / "empty.jsonl", "", "  "))


def test_messages_for_generation_must_end_with_the_user():
    assert validate_messages(turns("hi"), for_generation=True) == turns("hi")
    with pytest.raises(PicoGPTError, match="last message must be from the user"):
        validate_messages(turns("hi", "yo"), for_generation=True)


def test_the_split_is_seeded_disjoint_and_keeps_file_order(tmp_path):
    lines = [json.dumps({"messages": turns(f"q{i}", f"a{i}")}) for i in range(20)]
    conversations = read_conversations(write_lines(tmp_path / "c.jsonl", *lines))
    train, val = split_conversations(conversations, val_fraction=0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert sorted(c.source for c in train + val) == sorted(c.source for c in conversations)
    assert [c.source for c in val] == sorted((c.source for c in val), key=lambda s: int(s.rsplit(":", 1)[1]))
    again = split_conversations(conversations, val_fraction=0.2, seed=3)[1]
    other = split_conversations(conversations, val_fraction=0.2, seed=4)[1]
    assert [c.source for c in again] == [c.source for c in val] != [c.source for c in other]
    with pytest.raises(PicoGPTError, match="too few"):
        split_conversations(conversations[:1], val_fraction=0.1)


# ----------------------------------------------------------------------------------------------- templates as data


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_a_template_round_trips_through_a_weights_only_checkpoint(tmp_path, name):
    template = get_template(name)
    torch.save({"picogpt": {"chat_template": template.to_dict()}}, tmp_path / "t.ckpt")
    meta = torch.load(tmp_path / "t.ckpt", weights_only=True)["picogpt"]
    assert template_from_meta(meta) == template == ChatTemplate.from_dict(template.to_dict())


def test_templates_are_chosen_by_name_with_qa_the_default():
    assert get_template() is get_template("qa") is template_from_meta({}) is QA
    assert get_template({"system": "{content}", "user": "U:{content}", "assistant": "B:{content}\n"}).name == "custom"
    assert get_template(json.dumps(BUILTIN_TEMPLATES["im"].to_dict())) == BUILTIN_TEMPLATES["im"]
    with pytest.raises(PicoGPTError, match="not valid JSON"):
        get_template('{"system": ')
    with pytest.raises(PicoGPTError, match="unknown chat template 'chatml'; use one of qa, im"):
        get_template("chatml")
    with pytest.raises(PicoGPTError, match="a dict with the keys system, user and assistant"):
        get_template({"user": "{content}"})


@pytest.mark.parametrize(
    ("assistant", "expected"),
    [
        ("A: {answer}\n", r"found \{answer\}"),
        ("A: no placeholder\n", "found no placeholder"),
        ("A: {content} {content}\n", r"found \{content\}, \{content\}"),
        ("A: {content!r}\n", r"found \{content!r\}"),
        ("A: {content\n", "does not render"),
        ("A: }{content}\n", "does not render"),
    ],
)
def test_a_template_that_does_not_render_is_one_clear_line(assistant, expected):
    with pytest.raises(PicoGPTError, match=expected) as error:
        ChatTemplate("mine", system="{content}\n", user="Q: {content}\n", assistant=assistant)
    assert str(error.value).startswith("chat template 'mine': the assistant format") and "\n" not in str(error.value)


def test_doubled_braces_are_literal_braces():
    template = ChatTemplate("braces", system="{content}", user="{{user}} {content}\n", assistant="{{bot}} {content}\n")
    assert template.render(turns("hi", "yo"), has_eot=False) == "{user} hi\n{bot} yo\n"


# ----------------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the test must never reach the network
    return pytest.importorskip("transformers")


TRICKY = ChatTemplate("tricky", system="<<{content}>> \\n {{% raw %}}\n", user='"U}}": {content}\t\n',
                      assistant="«B» '{content}' {{{{ é 😀\n\n")


@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES.values(), TRICKY], ids=lambda t: t.name)
@pytest.mark.parametrize("has_eot", [True, False])
def test_the_jinja_template_gives_transformers_exactly_our_generation_prompt(transformers, template, has_eot):
    from picogpt_lightning.export import hf_tokenizer

    ours = trained("bpe")
    fast, special = hf_tokenizer(ours)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=fast, eos_token=special)
    hf.chat_template = template.jinja(has_eot)
    for messages in (TWO_TURNS[:4], TWO_TURNS[1:2], turns("Q: {content}?", "A \"quoted\" {{answer}}", "and?")):
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == template.render(messages, has_eot, add_generation_prompt=True)
        assert hf.apply_chat_template(messages, tokenize=False) == template.render(messages, has_eot)
    if has_eot:  # our tokenizer has end-of-text: the same text gives the same ids
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == encode_conversation(messages, template, ours, add_generation_prompt=True).ids
