"""Prompt templates: the built-in ones render what training renders (the reference's prompt included), and the
model's own chat template (`data.template: model` / `auto`): masks on tiny Qwen2 (ChatML) and Llama-3-style
tokenizers, agreement with `{% generation %}` masks, the end-of-turn token learned when pad == eos, templates whose
masks cannot be derived, and the same template at training and at generation."""

from __future__ import annotations

import json
import re

import pytest
from conftest import CHATML_TEMPLATE, LLAMA3_TEMPLATE
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from loraft.cli import main
from loraft.data import tokenize_conversations
from loraft.encode import encode_segments
from loraft.errors import ConfigError, TemplateError
from loraft.templates import TEMPLATES, Template, get_template

CONVERSATIONS = [
    [{"role": "user", "content": "人工智能是什么\n"}, {"role": "assistant", "content": "一门学科。"}],
    [{"role": "system", "content": "你是助手"}, {"role": "user", "content": " 写诗\n春天 "},
     {"role": "assistant", "content": "春眠不觉晓"}, {"role": "user", "content": "再来"},
     {"role": "assistant", "content": "处处闻啼鸟"}],
    [{"role": "user", "content": "hi"}],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_renders_what_training_renders(name, generation_prompt, tiny_bloom_dir):
    template = TEMPLATES[name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    tokenizer.chat_template = template.jinja
    for messages in CONVERSATIONS:
        expected = template.render_text(messages, tokenizer.eos_token, generation_prompt)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert rendered == expected


def test_human_assistant_is_the_reference_prompt():
    template = get_template("human_assistant")
    instruction, given_input, output = "写一首诗 ", "关于春天\n", "春眠不觉晓"
    segments = template.render(
        [{"role": "user", "content": "\n".join([instruction, given_input])}, {"role": "assistant", "content": output}],
        "</s>",
    )
    reference_prompt = "\n".join(["Human: " + instruction, given_input]).strip() + "\n\nAssistant: "
    assert [(s.text, s.supervised) for s in segments] == [(reference_prompt, False), (output + "</s>", True)]


def test_multi_turn_supervises_every_assistant_turn(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    segments = get_template("human_assistant").render(CONVERSATIONS[1], tokenizer.eos_token)
    assert [s.supervised for s in segments] == [False, True, False, True]
    input_ids, labels = encode_segments(tokenizer, segments)
    assert input_ids.count(tokenizer.bos_token_id) == 1 and input_ids[0] == tokenizer.bos_token_id
    supervised = [i for i, label in zip(input_ids, labels) if label != -100]
    assert tokenizer.decode(supervised) == "春眠不觉晓</s>处处闻啼鸟</s>"


def test_unknown_template_lists_known_ones():
    with pytest.raises(Exception, match=r"^data.template: unknown template 'nope' \(known: alpaca, auto, chatml, human_assistant, model\)$"):
        get_template("nope")


def test_the_public_renderer_gives_the_same_segments(monkeypatch):
    """loraft calls transformers' compiled template directly; where those internals are gone it falls back to
    render_jinja_template, and the segments are the same."""
    import loraft.templates

    direct = {name: [TEMPLATES[name].render(m, "</s>", p) for m in CONVERSATIONS for p in (False, True)]
              for name in TEMPLATES}
    monkeypatch.setattr(loraft.templates, "_renderer_internals", lambda: (None, None))
    public = {name: [TEMPLATES[name].render(m, "</s>", p) for m in CONVERSATIONS for p in (False, True)]
              for name in TEMPLATES}
    assert public == direct and any(s.supervised for segments in direct["chatml"] for s in segments)


# ------------------------------------------------------------------------------------------ the model's own template

MODEL_TEMPLATE_CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [{"role": "system", "content": "你是一个有帮助的助手。"}, {"role": "user", "content": "1 2 3"},
     {"role": "assistant", "content": "4 5 6"}, {"role": "user", "content": "ABC"},
     {"role": "assistant", "content": "abc"}],
    [{"role": "user", "content": "今天天气很好"}, {"role": "assistant", "content": " 春眠不觉晓 "},
     {"role": "user", "content": "再来"}, {"role": "assistant", "content": "处处闻啼鸟。"}],
]
# The same two templates with the assistant turn marked by {% generation %}, as some model templates are.
GENERATION_TEMPLATES = {
    "qwen2": CHATML_TEMPLATE.replace(
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
        "{%- if message['role'] == 'assistant' -%}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{%- else -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{%- endif -%}"),
    "llama3": LLAMA3_TEMPLATE.replace(
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
        "'<|eot_id|>' }}",
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{%- if message['role'] == "
        "'assistant' -%}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endif -%}"),
}


@pytest.fixture(params=["qwen2", "llama3"])
def family(request):
    directory = request.getfixturevalue("tiny_qwen2_dir" if request.param == "qwen2" else "tiny_llama3_dir")
    return request.param, AutoTokenizer.from_pretrained(directory)


def _supervised_text(tokenizer, input_ids, labels):
    return tokenizer.decode([i for i, label in zip(input_ids, labels) if label != -100])


def test_generation_templates_render_like_the_originals(family):
    name, tokenizer = family
    marked = Template("marked", "", GENERATION_TEMPLATES[name], dict(tokenizer.special_tokens_map))
    for messages in MODEL_TEMPLATE_CONVERSATIONS:
        assert marked.render_text(messages, tokenizer.eos_token) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_model_template_masks_only_assistant_content_and_end_of_turn(family):
    name, tokenizer = family
    template = get_template("model", tokenizer)
    end = "<|im_end|>" if name == "qwen2" else "<|eot_id|>"
    assert template.stop_text(tokenizer.eos_token) == end
    for messages in MODEL_TEMPLATE_CONVERSATIONS:
        input_ids, labels = encode_segments(tokenizer, template.render(messages, tokenizer.eos_token))
        # the ids are the whole conversation's, tokenized as apply_chat_template's text; one BOS at most
        assert input_ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                                      add_special_tokens=False)["input_ids"]
        assert input_ids.count(tokenizer.bos_token_id) == (1 if name == "llama3" else 0)
        # the Llama-3 template trims contents, ChatML keeps them as they are
        answers = [m["content"].strip() if name == "llama3" else m["content"] for m in messages
                   if m["role"] == "assistant"]
        assert _supervised_text(tokenizer, input_ids, labels) == "".join(answer + end for answer in answers)


def test_prefix_masks_equal_generation_block_masks_and_transformers_assistant_masks(family):
    name, tokenizer = family
    derived = get_template("model", tokenizer)
    marked = Template("marked", "", GENERATION_TEMPLATES[name], dict(tokenizer.special_tokens_map))
    for messages in MODEL_TEMPLATE_CONVERSATIONS:
        ours = encode_segments(tokenizer, derived.render(messages, tokenizer.eos_token))
        assert encode_segments(tokenizer, marked.render(messages, tokenizer.eos_token)) == ours
        tokenizer.chat_template = GENERATION_TEMPLATES[name]
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours[0]
        assert theirs["assistant_masks"] == [int(label != -100) for label in ours[1]]


def test_end_of_turn_is_learned_when_pad_is_eos(tiny_llama3_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    conversations = [{"messages": m} for m in MODEL_TEMPLATE_CONVERSATIONS]
    dataset, _ = tokenize_conversations(conversations, tokenizer, get_template("model", tokenizer), 256)
    rows = [dataset[i] for i in range(len(dataset))]
    batch = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)(
        [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    eot = tokenizer.eos_token_id
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        assert row["labels"][-1] == eot  # the data stage supervises the final <|eot_id|>
        assert int(batch["labels"][index, length - 1]) == eot  # and the collator keeps it
        assert (batch["labels"][index, length:] == -100).all()  # padding (the same id) is not trained on
        assert sum(1 for label in row["labels"] if label == eot) == sum(
            1 for m in MODEL_TEMPLATE_CONVERSATIONS[index] if m["role"] == "assistant")


@pytest.mark.parametrize("jinja, reason", [
    # rewrites earlier assistant turns (as templates that strip past reasoning do)
    ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n...<|im_end|>"
     "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "rendering the conversation one turn longer changes the text before it (at message 2)"),
    # ends assistant turns with plain text only: the model would never learn to stop
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant: {% endif %}",
     "no special token (such as EOS) ends the assistant turn of message 2"),
])
def test_templates_whose_masks_cannot_be_derived_are_refused(tiny_qwen2_dir, tmp_path, jinja, reason):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    tokenizer.chat_template = jinja
    with pytest.raises(TemplateError, match="^template model: " + re.escape(reason)):
        get_template("model", tokenizer).render(MODEL_TEMPLATE_CONVERSATIONS[2], tokenizer.eos_token)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": MODEL_TEMPLATE_CONVERSATIONS[2]}, ensure_ascii=False) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["data", "preview", str(data), "--model", str(tmp_path / "tok"), "--template", "model"]) == 2


def test_auto_takes_the_models_template_when_it_has_one(tiny_qwen2_dir, tiny_bloom_dir):
    assert get_template("auto", AutoTokenizer.from_pretrained(tiny_qwen2_dir)).name == "model"
    assert get_template("auto", AutoTokenizer.from_pretrained(tiny_bloom_dir)).name == "human_assistant"
    with pytest.raises(ConfigError, match="has no chat_template; name a template"):
        get_template("model", AutoTokenizer.from_pretrained(tiny_bloom_dir))


def test_preview_with_the_model_template(tiny_qwen2_dir, alpaca_jsonl, capsys):
    assert main(["data", "preview", str(alpaca_jsonl), "--model", str(tiny_qwen2_dir), "--template", "model",
                 "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "⟦<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n人工智能是什么<|im_end|>\n" \
           "<|im_start|>assistant\n⟧人工智能是计算机科学的一个分支。<|im_end|>⟦\n⟧" in out


def test_train_on_the_model_template_and_generate_with_the_same(tiny_qwen2_dir, tmp_path, alpaca_jsonl):
    from loraft.config import load_config
    from loraft.generate import encode_prompt, load_run, stop_token_ids
    from loraft.train import train

    run = tmp_path / "run"
    train(load_config(None, [f"model.name_or_path={tiny_qwen2_dir}", f"data.path={alpaca_jsonl}", f"output_dir={run}",
                             "train.max_steps=2", "adapter.target_modules=[q_proj,v_proj]",
                             "adapter.modules_to_save=null"]))
    record = json.loads((run / "loraft_run.json").read_text())
    assert record["template"] == "model"  # data.template auto chose the model's own
    model, tokenizer, template, _ = load_run(run)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "人工智能是什么"}]
    prompt = encode_prompt(tokenizer, template, messages)
    trained, labels = encode_segments(tokenizer, template.render(
        messages + [{"role": "assistant", "content": "答"}], tokenizer.eos_token))
    assert trained[:len(prompt)] == prompt and labels[len(prompt) - 1] == -100 and labels[len(prompt)] != -100
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, template)
