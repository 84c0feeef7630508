"""The Ollama Modelfile: its TEMPLATE, run by Go's text/template as Ollama runs it (tests/go), renders what loraft's
Jinja renders, for every loraft template and for model templates of the ChatML, Llama-3 and Mistral families;
unknown model templates get no TEMPLATE and a note; FROM/ADAPTER/TEMPLATE/SYSTEM/PARAMETER lines read back as
Ollama's Modelfile parser reads them; values the Modelfile format cannot hold are refused with a clear error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_CACHE, locked_test_cache
from loraft.errors import ConfigError, TemplateError
from loraft.export.ollama import chat_format, go_template, modelfile
from loraft.templates import ALPACA_SYSTEM, RAW_TEXT, TEMPLATES, Template, TemplateParts, Turn, get_template

GO_HARNESS = Path(__file__).parent / "go"
LORAFT_TEMPLATES = {**TEMPLATES, RAW_TEXT.name: RAW_TEXT}


def _go_binary(go: str, tmp_path_factory) -> Path:
    """tests/go built once per source and Go toolchain, kept in the test cache (a cold build of a newer Go than
    Debian 12's compiles the standard library first, tens of seconds); built in a fresh folder and renamed into
    place, so a worker never runs a half-written binary."""
    env = {**os.environ, "GOFLAGS": "", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GO111MODULE": "on",
           "CGO_ENABLED": "0"}
    version = subprocess.run([go, "version"], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256(version.encode())
    for source in sorted(GO_HARNESS.iterdir()):
        if source.is_file():
            key.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    binary = TEST_CACHE / "go" / f"ollamarender-{key.hexdigest()[:16]}"
    with locked_test_cache():
        if not binary.is_file():
            build = tmp_path_factory.mktemp("ollamarender")
            env.update(GOCACHE=str(build / "cache"), GOPATH=str(build / "gopath"))
            built = subprocess.run([go, "build", "-o", str(build / "ollamarender"), "."], cwd=GO_HARNESS, env=env,
                                   capture_output=True, text=True, timeout=300)
            assert built.returncode == 0, built.stderr
            binary.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(build / "ollamarender", binary.with_name(binary.name + ".partial"))
            os.replace(binary.with_name(binary.name + ".partial"), binary)
    return binary


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """render(template, conversations, system) -> texts: tests/go built once, run on a batch of conversations."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not on PATH (CI installs Debian's golang-go): the TEMPLATE's Go rendering is not checked")
    binary = _go_binary(go, tmp_path_factory)

    def render(template: str, conversations: list[list[dict]], system: str | None = None) -> list[str]:
        requests = [{"template": template, "messages": messages, "system": system or ""} for messages in conversations]
        done = subprocess.run([str(binary)], input=json.dumps(requests), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)
        errors = [result["error"] for result in results if "error" in result]
        assert not errors, errors[0]
        return [result["text"] for result in results]

    return render


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


# Alternating conversations (what every family accepts), ending either way, with Chinese text.
CONVERSATIONS = [
    [user("人工智能是什么?")],
    [user("人工智能是什么?"), assistant("一门学科。")],
    [user("写诗"), assistant("春眠不觉晓"), user("再来一首")],
    [user("写诗"), assistant("春眠不觉晓"), user("再来一首"), assistant("处处闻啼鸟")],
    [system("你是一个乐于助人的助手。"), user("你好")],
    [system("你是一个乐于助人的助手。"), user("你好"), assistant("你好！有什么可以帮你？")],
    [system("Be brief."), user("one"), assistant("two"), user("three")],
    [system("Be brief."), user("one"), assistant("two"), user("three"), assistant("four")],
]
# Contents str.strip() changes (human_assistant strips "Human: " + content, Llama-3 trims every content): spaces,
# newlines, tabs, the ideographic space and NBSP, whitespace only, empty; plus characters that are not whitespace.
EDGES = [
    [user(" 写诗\n春天 "), assistant("  春眠不觉晓\n")],
    [user("\u3000你好\u3000"), assistant("a\u00a0"), user("\t\x0b\x1c \n")],
    [user(""), assistant(" "), user("a\u2063")],
    [user("x😀"), assistant("\n\n"), user("line\r\n" + " " * 3000)],
    [system("  spaced system \n"), user("q "), assistant(" a")],
    [system("only a system prompt")],
]


def generation_prompt(messages):
    """The Go template writes the generation prompt after a final user (or system) message."""
    return not messages or messages[-1]["role"] != "assistant"


def jinja_renderings(template: Template, conversations, eos: str, bos: str = "") -> list[str]:
    """loraft's renderings; a model template's leading BOS (llama.cpp adds it when it tokenizes) asserted and cut."""
    texts = [template.render_text(m, eos, add_generation_prompt=generation_prompt(m)) for m in conversations]
    assert all(text.startswith(bos) for text in texts)
    return [text[len(bos):] for text in texts]


@pytest.mark.parametrize("name", sorted(LORAFT_TEMPLATES))
@pytest.mark.parametrize("eos", ["</s>", "<|im_end|>"])
def test_loraft_templates_render_the_same_in_go(name, eos, ollama_render):
    template = LORAFT_TEMPLATES[name]
    text, notes = modelfile("model-f16.gguf", template, eos)
    conversations = CONVERSATIONS + EDGES
    go = ollama_render(go_template(template, eos), conversations, system=template.parts.default_system)
    assert go == jinja_renderings(template, conversations, eos)
    assert f'TEMPLATE """{go_template(template, eos)}"""' in text and notes == []


def test_the_system_default_comes_from_the_modelfile(ollama_render):
    """alpaca writes its default system line when no message is a system message; in Ollama the Modelfile's SYSTEM
    is that line, put first by Ollama: without it the TEMPLATE writes none."""
    alpaca = TEMPLATES["alpaca"]
    text, _ = modelfile("model-f16.gguf", alpaca, "</s>")
    assert f'\nSYSTEM """{ALPACA_SYSTEM}"""\n' in text
    [without_system] = ollama_render(go_template(alpaca, "</s>"), [[user("hi")]])
    [with_system] = ollama_render(go_template(alpaca, "</s>"), [[user("hi")]], system=ALPACA_SYSTEM)
    assert with_system == alpaca.render_text([user("hi")], "</s>", True) == ALPACA_SYSTEM + "\n\n" + without_system


def test_documented_differences_are_ollamas_message_handling(ollama_render):
    """The two documented differences, and nothing else: Ollama merges consecutive messages of one role with
    "\\n\\n", and puts SYSTEM first whenever the first message is not a system message (alpaca's Jinja: only
    when no message is one)."""
    chatml, alpaca = TEMPLATES["chatml"], TEMPLATES["alpaca"]
    merged = ollama_render(go_template(chatml, "</s>"), [[user("a"), user("b"), assistant("c")]])
    assert merged == [chatml.render_text([user("a\n\nb"), assistant("c")], "</s>")]
    late_system = [user("a"), assistant("b"), system("s"), user("c")]
    go = ollama_render(go_template(alpaca, "</s>"), [late_system], system=ALPACA_SYSTEM)
    assert go == [alpaca.render_text([system(ALPACA_SYSTEM), *late_system], "</s>", True)]
    assert go != [alpaca.render_text(late_system, "</s>", True)]


def test_a_run_tokenizers_loraft_template_is_recognised():
    """A run's tokenizer carries its loraft template's Jinja as chat_template (`data.template: model` on it)."""
    for template in LORAFT_TEMPLATES.values():
        as_model = Template("model", "", template.jinja, {"bos_token": "<s>"})
        assert go_template(as_model, "</s>") == go_template(template, "</s>")


# Model templates as their tokenizer_config.json has them (trimmed of tool calling).
QWEN2_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V02 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# ChatML that trims contents: one character away from ChatML on a padded message, so not ChatML.
TRIMMED_CHATML = PLAIN_CHATML.replace("message['content']", "message['content'] | trim")

FAMILIES = {  # fixture: (Jinja, bos, eos, the format found, its default system prompt)
    "qwen2": (QWEN2_CHATML, "", "<|im_end|>", "the ChatML format", "You are a helpful assistant."),
    "chatml": (PLAIN_CHATML, "", "<|endoftext|>", "the ChatML format", None),
    "llama3": (LLAMA3_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>", "the Llama-3 format", None),
    "mistral-v0.1": (MISTRAL_V01, "<s>", "</s>", "the Mistral [INST] format (v0.1)", None),
    "mistral-v0.2": (MISTRAL_V02, "<s>", "</s>", "the Mistral [INST] format (v0.2)", None),
    "mistral-v0.3": (MISTRAL_V03, "<s>", "</s>", "the Mistral [INST] format (v0.3)", None),
}


def model_template(jinja: str, bos: str, eos: str, specials=()) -> Template:
    tokens = {"bos_token": bos, "eos_token": eos, "additional_special_tokens": list(specials)}
    return Template("model", "The model's own chat template (from its tokenizer).", jinja, special_tokens=tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_templates_of_known_families_render_the_same_in_go(family, ollama_render):
    jinja, bos, eos, found, default_system = FAMILIES[family]
    template = model_template(jinja, bos, eos)
    chat = chat_format(template, eos)
    assert (chat.name, chat.default_system) == (found, default_system)
    conversations = CONVERSATIONS + [c for c in EDGES if len(c) > 1 and c[0]["role"] != "system"]
    if family == "mistral-v0.1":  # takes no system message: the Go template leaves Ollama's out
        with pytest.raises(TemplateError, match="roles must alternate"):
            template.render_text(CONVERSATIONS[4], eos, True)
        go = ollama_render(go_template(template, eos), conversations)
        conversations = [[m for m in c if m["role"] != "system"] for c in conversations]
    else:
        go = ollama_render(go_template(template, eos), conversations, system=default_system)
    assert go == jinja_renderings(template, conversations, eos, bos)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHATML = QWEN2_CHATML.replace("You are a helpful assistant.", SMOLLM2_SYSTEM)


def test_a_chatml_whose_bos_token_is_im_start_is_chatml(ollama_render):
    """SmolLM2's BOS token is <|im_start|>, which its ChatML writes as text at every turn: not a BOS to cut (cut,
    the template was unknown and its Modelfile had no TEMPLATE)."""
    template = model_template(SMOLLM2_CHATML, "<|im_start|>", "<|im_end|>")
    chat = chat_format(template, "<|im_end|>")
    assert (chat.name, chat.default_system) == ("the ChatML format", SMOLLM2_SYSTEM)
    conversations = CONVERSATIONS + [c for c in EDGES if len(c) > 1 and c[0]["role"] != "system"]
    go = ollama_render(go_template(template, "<|im_end|>"), conversations, system=SMOLLM2_SYSTEM)
    assert go == jinja_renderings(template, conversations, "<|im_end|>")  # nothing cut: <|im_start|> is text here


def test_conftest_model_templates_are_known_families():
    from conftest import CHATML_TEMPLATE, LLAMA3_TEMPLATE

    assert chat_format(model_template(CHATML_TEMPLATE, "", "<|im_end|>"), "<|im_end|>").name == "the ChatML format"
    assert chat_format(model_template(LLAMA3_TEMPLATE, "<s>", "<|eot_id|>"), "<|eot_id|>").name == "the Llama-3 format"


def test_model_family_modelfile_lines():
    qwen = model_template(QWEN2_CHATML, "", "<|im_end|>", ["<|im_start|>", "<|im_end|>"])
    text, notes = modelfile("./model-q8_0.gguf", qwen, "<|im_end|>")
    assert read_modelfile(text) == [
        ("from", "./model-q8_0.gguf"), ("template", go_template(qwen, "<|im_end|>")),
        ("system", "You are a helpful assistant."), ("parameter stop", "<|im_end|>")]
    assert notes == ["the model's own chat template renders as the ChatML format: TEMPLATE is that format in Go, "
                     "SYSTEM its default system prompt"]
    llama3 = model_template(LLAMA3_INSTRUCT, "<|begin_of_text|>", "<|end_of_text|>", ["<|eot_id|>"])
    commands = read_modelfile(modelfile("model-f16.gguf", llama3, "<|end_of_text|>").text)
    assert [value for command, value in commands if command == "parameter stop"] == ["<|eot_id|>", "<|end_of_text|>"]
    mistral = model_template(MISTRAL_V01, "<s>", "</s>")
    assert modelfile("model-f16.gguf", mistral, "</s>").notes[-1] == (
        "the model's own chat template takes no system message: the TEMPLATE leaves system messages out")


@pytest.mark.parametrize("jinja", [GEMMA, TRIMMED_CHATML], ids=["gemma", "trimmed-chatml"])
def test_unknown_model_template_gets_no_template_and_a_note(jinja):
    template = model_template(jinja, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<|im_end|>"])
    assert go_template(template, "<eos>") is None
    text, notes = modelfile("model-f16.gguf", template, "<eos>", adapter_path="adapter-f32.gguf")
    stop = "<end_of_turn>" if jinja == GEMMA else "<|im_end|>"
    assert read_modelfile(text) == [("from", "./model-f16.gguf"), ("adapter", "./adapter-f32.gguf"),
                                    ("parameter stop", stop), ("parameter stop", "<eos>")]
    assert notes == ["the model's own chat template is not a format loraft can prove equal in Ollama's Go template "
                     "(ChatML, Llama-3, Mistral): TEMPLATE left out, so Ollama uses the closest of its built-in "
                     "templates to the GGUF's chat template, or none"]


def test_modelfile_lines():
    chatml = TEMPLATES["chatml"]
    text, notes = modelfile("model-f16.gguf", chatml, "<|endoftext|>", adapter_path=Path("lora/adapter-f32.gguf"),
                            parameters={"temperature": 0.7, "num_ctx": 4096, "penalize_newline": False,
                                        "stop": ["<|im_start|>", "<|im_end|>"]})
    assert text.startswith("# Ollama Modelfile written by loraft")
    assert read_modelfile(text) == [
        ("from", "./model-f16.gguf"), ("adapter", "./lora/adapter-f32.gguf"),
        ("template", go_template(chatml, "<|endoftext|>")),
        ("parameter stop", "<|im_end|>"), ("parameter stop", "<|endoftext|>"), ("parameter stop", "<|im_start|>"),
        ("parameter temperature", "0.7"), ("parameter num_ctx", "4096"), ("parameter penalize_newline", "false")]
    assert notes == []
    human = read_modelfile(modelfile("/abs/model.gguf", TEMPLATES["human_assistant"], "</s>").text)
    assert human[0] == ("from", "/abs/model.gguf") and human[-1] == ("parameter stop", "</s>")
    assert [c for c, _ in human].count("parameter stop") == 1  # the end of turn is EOS: no duplicate
    spaced = read_modelfile(modelfile("my model.gguf", chatml, "</s>", stop_strings=['say "stop"', "\n\n###"]).text)
    assert spaced[0] == ("from", "./my model.gguf")
    assert [v for c, v in spaced if c == "parameter stop"] == ['say "stop"', "\n\n###"]


QUOTES = '"""'


def test_triple_quotes_in_a_template_are_escaped_in_go(ollama_render):
    """A TEMPLATE writes every literal as a Go string, so \"\"\" (which would end the Modelfile value: the format has
    no escape) never appears in it; a SYSTEM line or stop string, written as they are, is refused instead."""
    quoting = TemplateParts(system=Turn("{{ .System }}", "\n"), user=Turn(f'Q{QUOTES} ', '"\n', strip="joined"),
                            header=f"A{QUOTES}: ", end=None, after="")
    from loraft.templates import _loraft_template

    template = _loraft_template("quoting", "", quoting)
    text, _ = modelfile("model-f16.gguf", template, "</s>")
    assert text.count(QUOTES) == 2 and read_modelfile(text)[1] == ("template", go_template(template, "</s>"))
    conversations = [[system("s"), user(' he said """hi""" '), assistant('"""')], [user("x")]]
    assert ollama_render(go_template(template, "</s>"), conversations) == jinja_renderings(
        template, conversations, "</s>")

    def with_system(line):
        return _loraft_template("quoting", "", TemplateParts(
            system=Turn(), user=Turn(), header="", end=None, after="", default_system=line))

    # Ollama's parser ends a value only at a line break, so """ inside one line reads back whole.
    inline = f"say {QUOTES}hi{QUOTES}"
    assert read_modelfile(modelfile("model-f16.gguf", with_system(inline), "</s>").text)[2] == ("system", inline)
    with pytest.raises(TemplateError) as error:
        modelfile("model-f16.gguf", with_system(inline + "\nplease"), "</s>")
    assert str(error.value) == ("Modelfile SYSTEM: 'say \"\"\"hi\"\"\"\\nplease' contains \"\"\", which ends a "
                                "Modelfile value (the Modelfile format has no escape for it)")
    with pytest.raises(TemplateError) as error:
        modelfile("model-f16.gguf", TEMPLATES["chatml"], "</s>", stop_strings=['"'])
    assert str(error.value) == ("Modelfile PARAMETER stop: '\"' has quotes where a Modelfile value begins or ends, and "
                                "the Modelfile format has no escape for them")
    with pytest.raises(TemplateError) as error:
        modelfile("model-f16.gguf", TEMPLATES["chatml"], "</s>", stop_strings=["a\u3000b"])
    assert str(error.value) == ("Modelfile PARAMETER stop: 'a\\u3000b' contains the non-printable character U+3000, "
                                "which Ollama's Modelfile parser drops")


def test_bad_parameter_name():
    with pytest.raises(ConfigError) as error:
        modelfile("model-f16.gguf", TEMPLATES["chatml"], "</s>", parameters={"top p": 0.9})
    assert str(error.value) == "Modelfile PARAMETER: 'top p' is not a parameter name (letters, digits, _)"


def test_no_heavy_imports():
    """The module is imported by the export and the CLI: no torch, transformers or jinja2 at import time."""
    module = Path(__file__).parents[1] / "src" / "loraft" / "export" / "ollama.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('ollama_only', {str(module)!r})\n"
            "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'jinja2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_get_template_names_have_a_go_template():
    assert all(go_template(get_template(name), "</s>") for name in TEMPLATES)


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's parser (parser/parser.go ParseFile) reads a Modelfile: `#` lines are
    comments; a command word, a space (PARAMETER: its name and a space), then a value that keeps printable
    characters, tabs and line breaks and ends at the first line break where the text so far, trimmed, is bare,
    "..." or \"\"\"...\"\"\" (no escapes); the quotes are then removed."""
    def complete(value: str):
        if value.startswith(QUOTES):
            return value[3:-3] if len(value) >= 6 and value.endswith(QUOTES) else None
        if value.startswith('"'):
            return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
        return value

    commands, position = [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
        elif text[position] == "#":
            position = text.index("\n", position) + 1
        else:
            name, _, rest = text[position:].partition(" ")
            command = name.lower()
            position += len(name) + 1
            if command == "parameter":
                key, _, rest = rest.partition(" ")
                command, position = f"parameter {key}", position + len(key) + 1
            value = None
            for end in range(position, len(text) + 1):
                if end == len(text) or text[end] in "\r\n":
                    kept = "".join(c for c in text[position:end] if c in "\t\r\n" or c.isprintable())
                    value = complete(kept.strip())
                    if value is not None:
                        break
            assert value is not None, f"{command}: the value never ends"
            commands.append((command, value))
            position = end + 1
    return commands
