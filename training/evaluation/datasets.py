"""The public evaluation sets the papers report on, read from a user's own copy (nothing downloads here).

- UCF-101 (HARIVO / PYoCo FVD and IS): `UCF101_CLASSES`, the 101 class names in `classInd.txt` order;
  `ucf101_prompt(name)` turns one into the prompt HARIVO samples ("ApplyEyeMakeup" -> "apply eye makeup");
  `ucf101_videos(root, split, fold)` lists the videos of a copy laid out as released
  (`UCF-101/<Class>/v_<Class>_gXX_cYY.avi` and `ucfTrainTestlist/{classInd,trainlistNN,testlistNN}.txt`).
- MSR-VTT (CLIPSIM): `msrvtt_captions(annotation_json, split)` reads the released annotation file
  (`train_val_videodatainfo.json` / `test_videodatainfo.json` / `MSRVTT_data.json`: `videos` with
  `video_id` and `split`, `sentences` with `video_id` and `caption`); `msrvtt_video_path(root, video_id)`
  finds `<video_id>.mp4` under the copy.

    python -m training.evaluation.datasets ucf101-prompts > ucf101_prompts.txt   # 101 prompts
    python -m training.evaluation.datasets msrvtt-prompts test_videodatainfo.json --split test > msrvtt.txt
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pipeline.configlib import read_text

UCF101_CLASSES = (
    "ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball "
    "BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling "
    "BoxingPunchingBag BoxingSpeedBag BreastStroke BrushingTeeth CleanAndJerk CliffDiving CricketBowling "
    "CricketShot CuttingInKitchen Diving Drumming Fencing FieldHockeyPenalty FloorGymnastics FrisbeeCatch "
    "FrontCrawl GolfSwing Haircut Hammering HammerThrow HandstandPushups HandstandWalking HeadMassage HighJump "
    "HorseRace HorseRiding HulaHoop IceDancing JavelinThrow JugglingBalls JumpingJack JumpRope Kayaking "
    "Knitting LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks ParallelBars PizzaTossing "
    "PlayingCello PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar PlayingTabla "
    "PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting RockClimbingIndoor RopeClimbing Rowing "
    "SalsaSpin ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling SoccerPenalty "
    "StillRings SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping "
    "Typing UnevenBars VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo"
).split()
"""UCF-101's 101 action classes, index i + 1 in the released `classInd.txt`."""

UCF101_VIDEOS_PER_CLASS = 100
"""HARIVO's UCF-101 protocol: 100 generated videos per class (sampling: output.videos_per_prompt=100)."""


def ucf101_prompt(name: str) -> str:
    """The class name as a prompt: CamelCase split into lower-case words ("YoYo" -> "yo yo")."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", name))


def ucf101_videos(root: str | Path, split: str = "test", fold: int = 1) -> list[tuple[Path, str]]:
    """(video path, class name) of one official split of a UCF-101 copy at `root` (the dir holding `UCF-101/`
    and `ucfTrainTestlist/`, or `UCF-101/` itself with the lists beside or inside it)."""
    root = Path(root)
    if split not in ("train", "test") or fold not in (1, 2, 3):
        raise ValueError(f"UCF-101 split must be train|test and fold 1-3, got {split!r} {fold}")
    lists = next(
        (d for d in (root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist") if d.is_dir()), None
    )
    videos = next((d for d in (root / "UCF-101", root) if (d / "ApplyEyeMakeup").is_dir()), None)
    if lists is None or videos is None:
        raise FileNotFoundError(
            f"{root} is not a UCF-101 copy: expected UCF-101/<Class>/*.avi and ucfTrainTestlist/ beside it"
        )
    classes = [line.split()[1] for line in read_text(lists / "classInd.txt").split("\n") if line.strip()]
    if [c.lower() for c in classes] != [c.lower() for c in UCF101_CLASSES]:
        raise ValueError(f"{lists}/classInd.txt does not list UCF-101's 101 classes in the released order")
    out = []
    for line in read_text(lists / f"{split}list{fold:02d}.txt").split("\n"):
        if not line.strip():
            continue
        rel = line.split()[0]  # "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi" (+ " 1" in trainlists)
        folder = rel.split("/")[0]
        name = next((c for c in UCF101_CLASSES if c.lower() == folder.lower()), None)
        if name is None:
            raise ValueError(f"{rel}: unknown UCF-101 class {folder!r}")
        path = videos / rel
        if not path.is_file():
            raise FileNotFoundError(f"UCF-101 list names {rel}, missing under {videos}")
        out.append((path, name))
    return out


def msrvtt_captions(annotation: str | Path, split: str | None = "test") -> list[tuple[str, str]]:
    """(video_id, caption) of every sentence of the videos of `split` (None: all) in an MSR-VTT annotation file."""
    data = json.loads(read_text(annotation))
    if "sentences" not in data or "videos" not in data:
        raise ValueError(f"{annotation}: not an MSR-VTT annotation file (no 'videos' / 'sentences')")
    keep = {v["video_id"] for v in data["videos"] if split is None or v.get("split") == split}
    if split is not None and not keep:
        splits = sorted({str(v.get("split")) for v in data["videos"]})
        raise ValueError(f"{annotation}: no videos of split {split!r} (it has {splits})")
    return [(s["video_id"], s["caption"].strip()) for s in data["sentences"] if s["video_id"] in keep]


def msrvtt_video_path(root: str | Path, video_id: str) -> Path:
    """`<video_id>.mp4` anywhere under an MSR-VTT copy (TrainValVideo/, TestVideo/, videos/all/, ...)."""
    root = Path(root)
    for sub in ("", "TrainValVideo", "TestVideo", "videos/all", "MSRVTT/videos/all"):
        path = root / sub / f"{video_id}.mp4"
        if path.is_file():
            return path
    found = next(root.rglob(f"{video_id}.mp4"), None)
    if found is None:
        raise FileNotFoundError(f"no {video_id}.mp4 under {root}")
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluation.datasets", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ucf101-prompts", help="UCF-101's 101 class names as prompts, one per line")
    m = sub.add_parser("msrvtt-prompts", help="MSR-VTT captions (one per video: its first) as prompts")
    m.add_argument("annotation")
    m.add_argument("--split", default="test")
    m.add_argument("--all-captions", action="store_true", help="every caption, not the first per video")
    a = p.parse_args(argv)
    if a.command == "ucf101-prompts":
        print("\n".join(ucf101_prompt(c) for c in UCF101_CLASSES))
        return
    try:  # the user's annotation file: bad bytes, not JSON, not MSR-VTT's layout
        captions = msrvtt_captions(a.annotation, a.split)
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    seen: set[str] = set()
    for video_id, caption in captions:
        if a.all_captions or video_id not in seen:
            seen.add(video_id)
            print(caption)


if __name__ == "__main__":
    main()
