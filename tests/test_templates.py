import pytest
from transformers import AutoTokenizer

from loraft.data import encode_segments
from loraft.templates import TEMPLATES, get_template

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
