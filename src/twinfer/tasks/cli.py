"""``twinfer classify`` and ``twinfer detect``: image tasks from the command line.

Register them on the main parser's subcommands::

    from twinfer.tasks import cli as tasks_cli
    tasks_cli.add_arguments(subparsers)
    ...
    args = parser.parse_args()
    return args.func(args)          # each subcommand sets ``func``

``func`` takes the parsed arguments and returns the exit status (0 on
success, 1 on a server or connection error, 2 on a bad local file).
``twinfer detect MODEL photo.jpg --draw out.png`` prints one line per
prediction and writes the photo with its boxes and labels drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageDraw, ImageFont, ImageOps
from twisted.internet.defer import Deferred

from twinfer.client import DEFAULT_SERVER, connect, parse_servers
from twinfer.errors import TwinferError
from twinfer.wire.messages import Prediction

#: Box colours, cycled by class id.
_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60))  # fmt: skip


def add_arguments(subparsers: Any) -> None:
    """Add the ``classify`` and ``detect`` subcommands to an argparse subparsers object."""
    for task, summary in (
        ("classify", 'classify an image with an image model (task = "classify")'),
        ("detect", 'detect objects in an image with an image model (task = "detect")'),
    ):
        parser = subparsers.add_parser(task, help=summary, description=summary)
        parser.add_argument("model", help="name of the served model")
        parser.add_argument("image", type=Path, help="image file (JPEG, PNG, BMP, WebP...)")
        parser.add_argument(
            "--server", "-s", default=DEFAULT_SERVER,
            help=f"server endpoint, e.g. tcp:HOST:PORT or tls:HOST:PORT (default {DEFAULT_SERVER})",
        )  # fmt: skip
        parser.add_argument(
            "--draw", metavar="OUT.png", type=Path,
            help="write the image with the predictions drawn on it",
        )  # fmt: skip
        parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
        parser.set_defaults(func=run, task=task)


def format_predictions(predictions: Sequence[Prediction], task: str) -> str:
    """One line per prediction: label, confidence and (for detections) the box."""
    if not predictions:
        return "no detections\n" if task == "detect" else "no predictions\n"
    lines = []
    for p in predictions:
        line = f"{p.label:<20} {p.confidence:7.4f}"
        if task == "detect":
            x1, y1, x2, y2 = p.box
            line += f"  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]"
        lines.append(line)
    return "\n".join(lines) + "\n"


def draw_predictions(
    image: bytes, predictions: Sequence[Prediction], task: str, out: Path | str
) -> None:
    """Write ``image`` (encoded bytes) to ``out`` with the predictions drawn.

    Detections get a box and a "label 0.93" tag; classifications are listed
    in the top-left corner.  The image is turned upright first (EXIF), as
    the server does, so the boxes land where they belong.
    """
    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(image))).convert("RGB")
    draw = ImageDraw.Draw(picture)
    font_size = max(12, min(picture.size) // 40)
    font = ImageFont.load_default(size=font_size)
    width = max(2, min(picture.size) // 200)
    if task == "detect":
        for p in predictions:
            colour = _COLOURS[p.label_id % len(_COLOURS)]
            draw.rectangle(p.box, outline=colour, width=width)
            tag = f"{p.label} {p.confidence:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
            x, y = p.box[0], max(0.0, p.box[1] - (bottom - top) - 2 * width)
            tag_box = (x, y, x + right - left + 2 * width, y + bottom + 2 * width)
            draw.rectangle(tag_box, fill=colour)
            draw.text((x + width, y + width), tag, fill=(255, 255, 255), font=font)
    else:
        y = 4.0
        for p in predictions:
            tag = f"{p.label} {p.confidence:.3f}"
            draw.text((5, y + 1), tag, fill=(0, 0, 0), font=font)
            draw.text((4, y), tag, fill=(255, 255, 255), font=font)
            y += font_size * 1.3
    picture.save(out)


async def image_command(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    """Run ``classify``/``detect`` with parsed ``args``, printing to ``out``; the exit status."""
    try:
        image = args.image.read_bytes()
    except OSError as e:
        print(f"twinfer: cannot read {args.image}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        servers = parse_servers(args.server)
        client = await connect(reactor, servers if len(servers) > 1 else args.server)
    except TwinferError as e:
        print(f"twinfer: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # connection refused, DNS...: whatever the endpoint raises
        print(f"twinfer: cannot connect to {args.server}: {e}", file=sys.stderr)
        return 1
    try:
        predictions = await client.predict(args.model, image, args.task)
    except TwinferError as e:
        print(f"twinfer: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        out.write(json.dumps([p.as_dict() for p in predictions], indent=2) + "\n")
    else:
        out.write(format_predictions(predictions, args.task))
    if args.draw is not None:
        try:
            draw_predictions(image, predictions, args.task, args.draw)
        except (OSError, ValueError) as e:
            print(f"twinfer: cannot draw into {args.draw}: {e}", file=sys.stderr)
            return 2
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the subcommand on a fresh reactor; returns the exit status."""
    from twisted.internet import task

    status: list[int] = []

    def main(reactor: Any) -> Deferred[None]:
        d = Deferred.fromCoroutine(image_command(reactor, args, sys.stdout))
        return d.addCallback(status.append)

    with contextlib.suppress(SystemExit):  # react always exits; the status is the command's
        task.react(main)
    return status[0] if status else 1
