"""Test models derived from the real test GGUF (../shared/test-model.md) with llama.cpp's
`gguf` package: the same weights with a chat template of their own (one that shows
tools too), split in parts,
with an architecture llama.cpp does not know, or with their tensor data cut short.

Each is written once per machine into the test cache and reused while this file and
the source model are unchanged (a few seconds each for a 253 MB model).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

# A chat template in Gemma's turn format, as instruct GGUFs carry one (written for these
# tests): a system message goes before the first user turn, the assistant is `model`.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set preamble = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set preamble = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (preamble if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
# The same turns, with tools shown to the model and tool calls written the Hermes / Qwen way
# (<tool_call>{"name": ..., "arguments": ...}</tool_call>, results in <tool_response>), as
# tool-calling instruct GGUFs carry (written for these tests); a call's arguments are written as
# given, a string as OpenAI sends them or an object as llama.cpp's template analysis does.
TOOLS_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<start_of_turn>system\nYou may call these tools:\n<tools>\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson + '\n' -}}{%- endfor -%}"
    "{{- '</tools>\nTo call one, answer <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>'"
    " + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<start_of_turn>user\n<tool_response>\n' + message['content'] + '\n</tool_response><end_of_turn>\n' -}}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{{- '<start_of_turn>model\n' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' -}}"
    "{%- set arguments = call['function']['arguments'] -%}"
    "{{- arguments if arguments is string else arguments | tojson -}}{{- '}\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
# The same, but a call's arguments joined to the text with `+` only, as some GGUFs write them:
# llama-cpp-python's Jinja renders it, llama-server's analysis of tool calls cannot read it.
JOINED_TOOLS_TEMPLATE = TOOLS_TEMPLATE.replace(
    "{%- set arguments = call['function']['arguments'] -%}"
    "{{- arguments if arguments is string else arguments | tojson -}}{{- '}\n</tool_call>' -}}",
    "{{- call['function']['arguments'] + '}\n</tool_call>' -}}")
assert JOINED_TOOLS_TEMPLATE != TOOLS_TEMPLATE
UNKNOWN_ARCHITECTURE = "gemma99"


def _copy(source: Path, target: Path, changes: dict[str, str], split_max_tensors: int = 0) -> None:
    """Rewrite a GGUF with string metadata `changes` (general.architecture included),
    and split into parts of at most `split_max_tensors` tensors when that is not 0."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = changes.get("general.architecture") or reader.get_field("general.architecture").contents()
    writer = GGUFWriter(target, arch=arch, split_max_tensors=split_max_tensors)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in changes:
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in changes.items():
        if key != "general.architecture":
            writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()


def _cut(source: Path, target: Path) -> None:
    """The header and the first part of the tensor data: an interrupted upload."""
    with source.open("rb") as src, target.open("wb") as out:
        out.write(src.read(source.stat().st_size * 3 // 4))


class DerivedModels:
    """Paths of the derived models, made on first use under `folder`."""

    def __init__(self, source: Path, folder: Path):
        stamp = hashlib.sha256(Path(__file__).read_bytes() + str(source.stat().st_size).encode()).hexdigest()[:12]
        self.source, self.folder = source, folder / stamp
        if folder.exists():
            for old in folder.iterdir():
                if old != self.folder:
                    shutil.rmtree(old, ignore_errors=True)

    def _made(self, name: str, make) -> list[Path]:
        """The file(s) `make(target)` writes, made once: a folder is complete only when renamed."""
        done = self.folder / name
        if not done.exists():
            work = self.folder / f"{name}.partial"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            make(work / f"{name}.gguf")
            work.rename(done)
        return sorted(done.iterdir())

    def _with_chat_template(self, name: str, template: str) -> Path:
        """The test model with `template` as its `tokenizer.chat_template`."""
        (path,) = self._made(name, lambda target: _copy(self.source, target, {"tokenizer.chat_template": template}))
        return path

    def with_template(self) -> Path:
        """The test model with `tokenizer.chat_template`, as instruct models ship."""
        return self._with_chat_template("gemma-3-270m-it-Q4_K_M", GEMMA_TEMPLATE)

    def with_tools_template(self) -> Path:
        """The test model with a chat template that shows tools, as tool-calling models ship."""
        return self._with_chat_template("gemma-3-270m-tools-Q4_K_M", TOOLS_TEMPLATE)

    def with_joined_tools_template(self) -> Path:
        """The test model with a tools template llama-server cannot analyse (JOINED_TOOLS_TEMPLATE)."""
        return self._with_chat_template("gemma-3-270m-joined-Q4_K_M", JOINED_TOOLS_TEMPLATE)

    def split(self) -> list[Path]:
        """The test model in three parts, named as llama.cpp's gguf-split names them."""
        from gguf import GGUFReader
        tensors = len(GGUFReader(self.source).tensors)
        return self._made("gemma-3-270m-Q4_K_M", lambda target: _copy(
            self.source, target, {}, split_max_tensors=tensors // 3 + 1))

    def unknown_architecture(self) -> Path:
        (path,) = self._made("gemma-3-270m-future-Q4_K_M", lambda target: _copy(
            self.source, target, {"general.architecture": UNKNOWN_ARCHITECTURE}))
        return path

    def cut_short(self) -> Path:
        (path,) = self._made("gemma-3-270m-cut-Q4_K_M", lambda target: _cut(self.source, target))
        return path
