"""Every change this image makes to third-party code, in one place, and the versions
it was written against: `install` refuses to start the server, with one line, when
the installed llama-cpp-python, sse-starlette or starlette is not the pinned one
(requirements/image.txt), because each patch below reaches into their internals.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from importlib import metadata

from .checks import ServedModel
from .client import GENERATION, Generation
from .guard import RequestGuard
from .log import report_start_failure, start_failure

# enum ggml_log_level in the pinned llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
# (llama_cpp/_logger.py of 0.3.36 still documents an older order).
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5
# The versions the patches below were written against and tested with; each reaches
# into internals that change without notice (requirements/image.txt pins the same).
WRITTEN_FOR = {"llama-cpp-python": "0.3.36", "sse-starlette": "3.7.0", "starlette": "1.10.0"}


def version_mismatch(installed: dict[str, str | None]) -> str | None:
    """One line naming each package whose installed version is not the one written for."""
    wrong = [f"{name} {installed.get(name) or 'missing'} (written for {version})"
             for name, version in WRITTEN_FOR.items() if installed.get(name) != version]
    if not wrong:
        return None
    return (f"the server's patches (localllm_container/server/patches.py) do not fit {', '.join(wrong)}: "
            "install the versions in requirements/image.txt, or check each patch against the new version "
            "and update WRITTEN_FOR")


def installed_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {name: version(name) for name in WRITTEN_FOR}


def install() -> logging.Filter:
    """Applied by uvicorn's log config before the app is imported: wrap the app the
    factory makes in RequestGuard, and let streams drain on stop (uvicorn then waits
    for them up to UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN, which the entrypoint sets)."""
    mismatch = version_mismatch(installed_versions())
    if mismatch:
        report_start_failure(mismatch)
        raise RuntimeError(mismatch)  # not started by the entrypoint: fail as any import would
    import llama_cpp.server.app as server_app
    from sse_starlette.sse import AppStatus

    make_app = server_app.create_app
    llama_errors = keep_llama_errors()
    load_cpu_backend()

    def create_guarded_app(*args, **kwargs):
        from starlette.middleware import Middleware
        try:
            app = make_app(*args, **kwargs)
        except Exception as exc:
            report_start_failure(start_failure(exc, llama_errors))
            raise
        proxy = server_app._llama_proxy
        model = ServedModel.of(proxy._current_model, proxy._default_model_alias)
        watch_generations(proxy._current_model)
        # Innermost, inside the app's CORS middleware: its answers carry the CORS headers too.
        app.user_middleware.append(Middleware(RequestGuard, model=model))
        return app

    server_app.create_app = create_guarded_app
    refuse_unparsed_grammars()
    write_repetitions_as_llama_cpp_does()
    AppStatus.disable_automatic_graceful_drain()
    return logging.Filter()  # a filter in name only: it lets every record through


@functools.cache  # once per process: a second load would register a second CPU backend
def load_cpu_backend() -> None:
    """Load the CPU variant the entrypoint chose (GGML_BACKEND_PATH, localllm_container/cpu.py):
    llama.cpp built with GGML_BACKEND_DL has no backend until one is loaded, and
    llama-cpp-python never loads one (abetlen/llama-cpp-python#2069)."""
    import ctypes
    import os
    path = os.environ.get("GGML_BACKEND_PATH")
    if not path:
        return  # llama-cpp-python's own build: its CPU backend is linked in
    ggml = ctypes.CDLL(os.path.join(os.environ["LLAMA_CPP_LIB_PATH"], "libggml.so"))  # the one libllama loaded
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    if not ggml.ggml_backend_load(path.encode()):
        reason = f"llama.cpp could not load its CPU backend {path}: rebuild the image, or set CPU_LEVEL to another variant"
        report_start_failure(reason)
        raise RuntimeError(reason)


_log_callbacks: list = []  # ctypes callbacks must outlive their registration


def keep_llama_errors() -> list[str]:
    """Collect llama.cpp's error messages while passing every message on to
    llama-cpp-python's own logger, which prints them only when verbose."""
    import ctypes
    import llama_cpp
    from llama_cpp import _logger
    errors: list[str] = []
    last_level = 0

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        nonlocal last_level
        if level == GGML_LOG_ERROR or (level == GGML_LOG_CONT and last_level == GGML_LOG_ERROR):
            errors.append(text.decode("utf-8", "replace"))
        last_level = level if level != GGML_LOG_CONT else last_level
        _logger.llama_log_callback(level, text, user_data)

    _log_callbacks.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return errors


def refuse_unparsed_grammars() -> None:
    """A safety net under RequestGuard's grammar check: grammars the server builds
    itself (from response_format or tools JSON schemas) raise an error when llama.cpp
    cannot parse them, instead of being added to the sampler as NULL (a SIGSEGV)."""
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    def add_grammar(self, model, grammar) -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar._grammar.encode(), grammar._root.encode())
        if not sampler:
            raise ValueError("llama.cpp cannot parse the grammar made for this request")
        llama_cpp.llama_sampler_chain_add(self.sampler, sampler)

    LlamaSampler.add_grammar = add_grammar


def write_repetitions_as_llama_cpp_does() -> None:
    """JSON schemas become grammars with repetitions written `x{m,n}`, as llama.cpp's own
    converter (llama-server's) writes them, so that llama.cpp bounds them itself: a minimum
    above 2,000 is refused, a maximum above it is read as none. llama-cpp-python's converter
    spells each repetition out instead: `"maxLength": 1000000000` built a string of gigabytes
    (the server died), and 300 nested 300 parentheses deep, past the grammar parser's bound."""
    from llama_cpp import llama_grammar

    def build_repetition(item_rule, min_items, max_items, separator_rule=None, item_rule_is_literal=False):
        if max_items == 0:
            return ""
        if min_items == max_items == 1:
            return item_rule
        if min_items == 0 and max_items == 1:
            return f"{item_rule}?"
        if not separator_rule:
            if max_items is None and min_items in (0, 1):
                return f"{item_rule}{'*+'[min_items]}"
            return f"{item_rule}{{{min_items},{'' if max_items is None else max_items}}}"
        rest = build_repetition(f"({separator_rule} {item_rule})", max(min_items - 1, 0),
                                None if max_items is None else max_items - 1)
        return f"({item_rule} {rest})?" if min_items == 0 else f"{item_rule} {rest}"

    llama_grammar._build_repetition = build_repetition


def watch_generations(llama) -> None:
    """Wrap this Llama's generate(), the loop every completion runs, to count each request's
    tokens and to stop when its client has left. It finds the request in GENERATION, which
    starlette's worker threads inherit from the request's task."""
    import llama_cpp
    generate, vocab = llama.generate, llama._model.vocab

    def generate_watched(tokens, *args, **kwargs):
        generation = GENERATION.get()
        tokens_made = generate(tokens, *args, **kwargs)
        if generation is None:
            return tokens_made
        generation.prompt_tokens = len(tokens)
        return counted(generation, tokens_made)

    def counted(generation: Generation, tokens_made):
        with contextlib.closing(tokens_made):
            for token in tokens_made:
                if generation.client.gone:
                    logging.getLogger("uvicorn.error").info(
                        "the client left: generation stopped after %d tokens", generation.completion_tokens)
                    return
                if not llama_cpp.llama_vocab_is_eog(vocab, token):
                    generation.completion_tokens += 1
                yield token

    llama.generate = generate_watched
