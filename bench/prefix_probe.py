"""Does a text-only teacher continue its own answers from a cut after any of the student's tokens? The prefix probe
that a ``chunk_opd`` run asks before step 1 (``opdkit.teachers.prefix_probe``), on its own, for any teacher folder.

    .venv/bin/python bench/prefix_probe.py TEACHER STUDENT TRAIN [--prompts 4] [--max-completion-length 32] \\
        [--chunk-length 4] [--threads 1]

TEACHER and STUDENT are model folders (or ``builtin:<scenario>/<name>``), TRAIN a dataset (the run's
``data.train``): the teacher is served in this process by ``opd serve-teacher``'s app and reached as a chat API, as a
run with ``teacher.kind: chat`` reaches it; it answers the first ``--prompts`` training prompts greedily, and then
continues each answer from cuts after the student's tokens. Prints one JSON line: cuts, the share read right, the
share per context (the kinds of the characters either side of a cut), a few misread cuts and the run log's lines.
"""

from __future__ import annotations

import argparse
import json

import torch

from opdkit.config import ChatTeacherSpec
from opdkit.data import load_examples
from opdkit.models import load_model, load_tokenizer
from opdkit.serve import create_app, serve_in_thread
from opdkit.teachers.chat import ChatTeacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("student", help="the student whose tokens the cuts follow (its tokenizer only)")
    parser.add_argument("train", help="the training prompts (the first --prompts of them)")
    parser.add_argument("--prompts", type=int, default=4, help="as teacher.prefix_probe")
    parser.add_argument("--max-completion-length", type=int, default=32, help="as rollout.max_completion_length")
    parser.add_argument("--chunk-length", type=int, default=4, help="as teacher.chunk_length")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    examples = load_examples(args.train)
    with serve_in_thread(create_app(load_model(args.teacher), load_tokenizer(args.teacher), "teacher")) as url:
        spec = ChatTeacherSpec(kind="chat", base_url=url, model="teacher", chunk_length=args.chunk_length,
                               prefix_probe=args.prompts)
        teacher = ChatTeacher(spec, load_tokenizer(args.student))
        teacher.check_prefixes(examples, args.max_completion_length)
    print(json.dumps({"teacher": args.teacher, **teacher.findings.as_dict()}))


if __name__ == "__main__":
    main()
