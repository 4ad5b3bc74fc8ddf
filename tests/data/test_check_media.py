"""Issue 16 item 10: ``prepare_data.py convert --check-media`` decodes every referenced medium (worker
processes, progress on stderr) so a corrupt PNG, an empty WAV or a non-video is found before training:
per-reason counts and each bad file named; exit 2, or under ``--on-error skip`` their records are dropped
and counted."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from _media import write_image, write_mp4, write_wav
from entry_points import load_script


def entry():
    return load_script("code/prepare_data.py", "prepare_data_cm")


def rec(rid: str, key: str, path: str) -> dict:
    tag = {"images": "<image>", "audios": "<audio>", "videos": "<video>"}[key]
    return {"id": rid, "source": "t", key: [path],
            "messages": [{"role": "user", "content": f"{tag} what is it?"}, {"role": "assistant", "content": "x"}]}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cm")
    media = root / "media"
    media.mkdir()
    write_image(media / "ok.png", 64, 48)
    write_wav(media / "ok.wav", seconds=2.0)
    write_mp4(media / "ok.mp4", frames=12)
    png = (media / "ok.png").read_bytes()
    (media / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated: the header still says PNG
    sf.write(media / "empty.wav", [], 16000)  # a valid WAV header with no samples
    (media / "zero.wav").write_bytes(b"")
    (media / "text.mp4").write_text("this is not a video\n")
    records = [rec("good_img", "images", "ok.png"), rec("good_wav", "audios", "ok.wav"),
               rec("good_vid", "videos", "ok.mp4"), rec("bad_png", "images", "corrupt.png"),
               rec("bad_wav", "audios", "empty.wav"), rec("zero_wav", "audios", "zero.wav"),
               rec("bad_vid", "videos", "text.mp4"), rec("bad_png_again", "images", "corrupt.png")]  # fmt: skip
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, src


def argv(corpus, out, *extra):
    root, src = corpus
    return ["convert", "--format", "unified", "--input", str(src), "--output", str(out),
            "--media-root", str(root / "media"), "--check-media", "--workers", "2", *extra]  # fmt: skip


def test_bad_media_stop_the_conversion_naming_each_file(corpus, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    rc = entry().main(argv(corpus, out))
    err = capsys.readouterr().err
    media = corpus[0] / "media"
    assert rc == 2 and not out.exists(), err
    assert "4 of 7 media files" in err
    for name, reason in [("corrupt.png", "not a readable image"), ("empty.wav", "audio too short"),
                         ("zero.wav", "empty file"), ("text.mp4", "not a readable video")]:  # fmt: skip
        assert f"{media / name}: " in err and reason in err, (name, err)
    assert "ok.png:" not in err and "ok.wav:" not in err and "ok.mp4:" not in err
    assert "check-media: 7/7 media decoded, 4 bad" in err  # progress on stderr
    assert "Traceback" not in err


def test_skip_mode_drops_and_counts_their_records(corpus, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    rc = entry().main(argv(corpus, out, "--on-error", "skip"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    kept = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert kept == ["good_img", "good_wav", "good_vid"]
    assert "records read 8, written 3, skipped 5" in cap.out
    assert "2 x media: not a readable image" in cap.out and "1 x media: empty file" in cap.out
    assert "media decoded 7 (4 bad)" in cap.out and "text.mp4: video: not a readable video" in cap.out


def test_without_the_flag_nothing_is_decoded(corpus, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    a = argv(corpus, out)
    a.remove("--check-media")
    assert entry().main(a) == 0 and len(out.read_text().splitlines()) == 8
