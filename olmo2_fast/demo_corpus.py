"""The demo models' corpus: Python's own documentation, read from the running interpreter.

Documents, each a (name, text) pair:
  * every topic of `pydoc_data.topics` (the language reference text `help("with")` prints,
    ~465 KB in Python 3.11), named `topic:<key>`;
  * the docstrings (`__doc__`, not inherited) of the public classes, functions, methods and
    properties of a fixed list of pure-stdlib modules, and of the modules themselves, named by
    their qualified name (`os.path.join`); docstrings under MIN_DOC_CHARS and repeats of an
    earlier text are dropped.

Licence: the Python Software Foundation License (permissive, not public domain): the text is
© the Python Software Foundation.

Reproducible: the text depends only on the interpreter's version (no third-party package is read).
PINNED_PYTHON and CORPUS_SHA256 record the one the shipped models were trained on; `build_corpus`
tells the caller whether it got that corpus. The held-out split is by a hash of each document's
name, so it does not depend on the order documents are found in.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import warnings
from dataclasses import dataclass

# The interpreter whose stdlib text the shipped demo models were trained on, and that text's digest.
PINNED_PYTHON = (3, 11, 7)
CORPUS_SHA256 = "b3540af7717c97c6ed357963bdda724c8cbc80d893c21b5eff0e1737d411db71"

# Pure-stdlib modules whose docstrings join the corpus. Platform-specific ones (curses, tkinter,
# winreg, ctypes' platform parts) are left out so the text is the same on every Linux build.
MODULES = (
    "builtins", "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "cmd",
    "codecs", "collections", "collections.abc", "colorsys", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "enum",
    "fnmatch", "fractions", "ftplib", "functools", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "lzma", "math", "mimetypes", "netrc", "numbers", "operator", "os", "os.path", "pathlib", "pdb", "pickle",
    "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "sys",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "types",
    "typing", "unicodedata", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref",
    "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zlib",
)
MIN_DOC_CHARS = 80
HELDOUT_EVERY = 20  # one document in 20 (by name hash) is held out for validation

CHAT_QUESTIONS_TOPIC = ("Explain {}.", "What is {}?", "Tell me about {}.", "How does {} work?")
CHAT_QUESTIONS_API = ("What does {} do?", "Explain {}.", "How do I use {}?", "Tell me about {}.")
CHAT_EVERY = 4  # a chat-formatted copy of every topic and of one docstring in 4 joins the training text


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def digest(self) -> int:
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]
    heldout: tuple[Document, ...]
    sha256: str  # of all documents, in order

    @property
    def is_pinned(self) -> bool:
        """True when this is the text the shipped demo models were trained on."""
        return self.sha256 == CORPUS_SHA256

    def heldout_text(self) -> str:
        """The held-out documents as one plain text (the file eval commands and tests read)."""
        return "\n\n".join(d.text for d in self.heldout) + "\n"


def build_corpus() -> Corpus:
    documents = _topic_documents() + _docstring_documents()
    digest = hashlib.sha256()
    for d in documents:
        digest.update(f"{d.name}\0{d.text}\0".encode())
    train = tuple(d for d in documents if d.digest % HELDOUT_EVERY)
    heldout = tuple(d for d in documents if not d.digest % HELDOUT_EVERY)
    return Corpus(train, heldout, digest.hexdigest())


def chat_example(question: str, answer: str) -> str:
    """One user / assistant exchange exactly as demo.CHAT_TEMPLATE renders it (BOS first, EOS after the answer)."""
    return f"<|endoftext|><|user|>\n{question}\n<|assistant|>\n{answer}<|endoftext|>\n"


def training_texts(documents) -> list[str]:
    """Each document as plain text ending in <|endoftext|>, plus chat-formatted copies (see CHAT_EVERY)
    that ask about the document's subject and answer with its text."""
    texts = []
    for d in documents:
        texts.append(d.text + "<|endoftext|>")
        is_topic = d.name.startswith("topic:")
        if is_topic or d.digest % CHAT_EVERY == 0:
            questions = CHAT_QUESTIONS_TOPIC if is_topic else CHAT_QUESTIONS_API
            subject = _topic_subject(d.text) if is_topic else d.name
            texts.append(chat_example(questions[(d.digest >> 8) % len(questions)].format(subject), d.text))
    return texts


def _topic_subject(text: str) -> str:
    """'The "with" statement' -> 'the with statement': the topic's title as a question's object."""
    title = text.split("\n", 1)[0].replace('"', "").strip()
    return "the " + title[4:] if title.startswith("The ") else title


def _topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"topic:{key}", topics[key].strip()) for key in sorted(topics)]


def _docstring_documents() -> list[Document]:
    documents, seen = [], set()
    with warnings.catch_warnings():  # typing.io and friends warn when touched
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            module = importlib.import_module(module_name)
            for name, obj in _documented(module_name, module):
                doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
                text = inspect.cleandoc(doc) if doc else ""
                if len(text) >= MIN_DOC_CHARS and text not in seen:
                    seen.add(text)
                    documents.append(Document(name, text))
    return documents


def _documented(module_name: str, module):
    """(qualified name, object) for the module, the public classes and routines it defines (builtins: all of
    them), and those classes' public routines and properties; in sorted order."""
    yield module_name, module
    for name, obj in sorted(vars(module).items()):
        if name.endswith("hook"):  # sys keeps the pristine hooks as __name__: pytest or a debugger may replace them
            obj = vars(module).get(f"__{name}__", obj)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if module_name != "builtins" and not _defined_in(obj, module_name, module):
            continue  # re-exported from elsewhere: documented under its own module, or not at all
        yield f"{module_name}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if (not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property))
                        and _member_of(member, obj)):
                    yield f"{module_name}.{name}.{attr}", member


# Where the C or shared half of a module lives, when its name does not say so.
IMPLEMENTED_IN = {"os": ("posix",), "os.path": ("genericpath",)}


def _defined_in(obj, module_name: str, module) -> bool:
    """Whether `obj` belongs to the module: defined there, in its package's submodules (asyncio.events), or
    in its C accelerator (_io for io, posix for os)."""
    home = getattr(obj, "__module__", None) or ""
    own = (module.__name__, "_" + module_name.rsplit(".", 1)[-1], *IMPLEMENTED_IN.get(module_name, ()))
    return home in own or home.startswith(module.__name__ + ".")


def _member_of(member, cls) -> bool:
    """Whether a class attribute comes from the standard library (C methods carry no module), not from a
    third-party import that attached it to the class (transformers adds logging.Logger.warning_once)."""
    home = getattr(member.fget if isinstance(member, property) else member, "__module__", None)
    return home is None or home.split(".")[0] in sys.stdlib_module_names


def python_version() -> tuple[int, int, int]:
    return tuple(sys.version_info[:3])
