"""`mlxvid serve`: the OpenAI Videos API driven by the real `openai` SDK, the S2V job API, progress events,
cancelling, API keys, bad requests, and a server killed mid-job then restarted (tiny converted models)."""

from __future__ import annotations

import json
import sqlite3
import time

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from support.serve import ServeProcess, finished, wait_for

pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")

KEY = "k" * 8 + "0123456789abcdef"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny TI2V-5B-style model (one transformer, the Wan 2.2 VAE), converted to fp32."""
    from support.wan_checkpoints import converted_tiny_ti2v

    return converted_tiny_ti2v(tmp_path_factory.mktemp("serve-model"), "tiny-ti2v")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve") / "data"
    serve = ServeProcess(data, [tiny_model], "--max-upload-mb", "1").start()
    yield serve, data
    serve.stop()


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
        return f.read().split(") ")[1][0] != "Z"


def read_video(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_openai_sdk_create_poll_download_matches_generate(server, tiny_model, tmp_path):
    serve, data = server
    client = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused")
    video = client.videos.create(model="tiny-ti2v", prompt="a red kite over a beach", size="96x64",
                                 extra_body={"frames": 9, "steps": 3, "seed": 11, "guidance": 3.0})
    assert video.status == "queued" and video.object == "video"
    done = client.videos.poll(video.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    served = tmp_path / "served.mp4"
    served.write_bytes(client.videos.download_content(video.id).read())
    frames = read_video(served)
    assert frames.shape == (9, 64, 96, 3)
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
    assert Image.open(__import__("io").BytesIO(thumbnail)).size == (96, 64)

    from mlx_video.cli import main

    local = tmp_path / "local.mp4"
    main(["generate", "--model", str(tiny_model), "--prompt", "a red kite over a beach", "--size", "96x64",
          "--frames", "9", "--steps", "3", "--seed", "11", "--guidance", "3.0", "--output", str(local), "--quiet"])
    ours = json.loads(httpx.get(f"{serve.url}/api/jobs/{video.id}/sidecar").text)["settings"]
    theirs = json.loads(local.with_suffix(".json").read_text())["settings"]
    for key in ("seed", "steps", "frames", "width", "height", "guidance", "shift", "sampler", "negative_prompt", "prompt",
                "render_size"):
        assert ours[key] == theirs[key], key
    assert ours["latents_sha256"] == theirs["latents_sha256"]  # the same latents as `mlxvid generate`


def test_list_order_paging_and_delete(server):
    serve, data = server
    client = httpx.Client(base_url=serve.url)
    ids = [client.post("/v1/videos", json={"prompt": f"clip {i}", "size": "32x32", "frames": 5, "steps": 1}).json()["id"]
           for i in range(3)]
    for job_id in ids:
        wait_for(client, job_id, finished)
    page = client.get("/v1/videos", params={"limit": 2, "order": "asc", "after": ids[0]}).json()
    assert [v["id"] for v in page["data"]] == ids[1:] and page["last_id"] == ids[2]
    assert [v["id"] for v in client.get("/v1/videos", params={"q": "CLIP 1"}).json()["data"]] == [ids[1]]
    assert client.delete(f"/v1/videos/{ids[0]}").json() == {"id": ids[0], "deleted": True, "object": "video.deleted"}
    assert client.get(f"/v1/videos/{ids[0]}").status_code == 404
    assert not list((data / "videos").glob(f"{ids[0]}*"))


def test_progress_events_and_cancel(server):
    serve, _ = server
    client = httpx.Client(base_url=serve.url, timeout=30)
    long = client.post("/v1/videos", json={"prompt": "a long one", "size": "32x32", "frames": 5, "steps": 1000}).json()
    queued = client.post("/v1/videos", json={"prompt": "never runs", "size": "32x32", "frames": 5, "steps": 1}).json()
    events, last = [], None
    with client.stream("GET", f"/api/jobs/{long['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("id: "):
                last = int(line[4:])
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if (events[-1]["mlxvid"]["step"] or 0) >= 2:
                    break
    assert events[-1]["status"] == "in_progress" and events[-1]["mlxvid"]["steps"] == 1000
    assert events[-1]["mlxvid"]["preview_url"] and client.get(events[-1]["mlxvid"]["preview_url"]).status_code == 200
    assert client.post(f"/api/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/api/jobs/{long['id']}/cancel").json()["cancel_requested"]
    stopped = wait_for(client, long["id"], finished, timeout=60)
    assert stopped["status"] == "failed" and stopped["error"]["code"] == "cancelled"
    assert stopped["mlxvid"]["step"] < 1000
    assert client.get(f"/v1/videos/{queued['id']}").json()["error"]["code"] == "cancelled"
    assert client.get(f"/v1/videos/{long['id']}/content").status_code == 409
    # a client reconnecting with Last-Event-ID gets what it missed, ending with the final state
    with client.stream("GET", f"/api/jobs/{long['id']}/events", headers={"Last-Event-ID": str(last)}) as stream:
        later = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert later and later[-1]["mlxvid"]["status"] == "cancelled"


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "model": "no-such-model"}, 400, "unknown model 'no-such-model'"),
    ({"prompt": "x", "size": "big"}, 400, "--size takes WIDTHxHEIGHT"),
    ({"prompt": "x", "steps": 0}, 400, "--steps must be"),
    ({"prompt": "x", "frames": 6}, 400, "frames"),
    ({"prompt": "x", "output": "/tmp/evil.mp4"}, 400, "set by the server"),
    # a folder of the server's (the SR model is the registry's, under the models home)
    ({"prompt": "x", "upscale": "720p", "upscale_model": "/etc"}, 400, "set by the server"),
    ({"prompt": "x", "image": "/etc/hostname"}, 400, "uploaded file"),
    ({"prompt": "x", "colour": "red"}, 400, "unknown key 'colour'"),
    ({"prompt": "x", "size": "16384x16384", "frames": 121}, 413, "available"),
])
def test_bad_json_requests_get_the_cli_words(server, body, status, words):
    serve, data = server
    answer = httpx.post(serve.url + "/v1/videos", json=body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"]


def test_bad_uploads_and_bodies(server, tmp_path):
    serve, data = server
    url = serve.url + "/v1/videos"
    before = set(p.name for p in (data / "uploads").iterdir())
    notimage = httpx.post(url, data={"prompt": "x"}, files={"input_reference": ("photo.png", b"not a png", "image/png")})
    assert notimage.status_code == 400 and "photo" not in notimage.json()["error"]["message"].split(":")[0]
    assert "image" in notimage.json()["error"]["message"]
    big = httpx.post(url, data={"prompt": "x"}, files={"input_reference": ("a.png", b"0" * (2 << 20), "image/png")})
    assert big.status_code == 413
    malformed = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    wrong_kind = httpx.post(url, data={"prompt": "x"}, files={"input_reference": ("a.exe", b"MZ", "image/png")})
    assert wrong_kind.status_code == 400 and ".png" in wrong_kind.json()["error"]["message"]
    image = tmp_path / "in.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    sneaky = httpx.post(url, data={"prompt": "x", "size": "64x32", "frames": "5", "steps": "1"},
                        files={"input_reference": ("../../../escaped.png", image.read_bytes(), "image/png")})
    assert sneaky.status_code == 200, sneaky.text
    assert not list(data.parent.rglob("escaped.png")) and not list(tmp_path.parent.rglob("escaped.png"))
    new = set(p.name for p in (data / "uploads").iterdir()) - before
    assert new and all(n.startswith(sneaky.json()["id"] + "-") for n in new)  # stored under the server's names
    wait_for(httpx.Client(base_url=serve.url), sneaky.json()["id"], finished)


def test_api_key_and_host_rules(tiny_model, tmp_path, capsys):
    from mlx_video.cli import main

    for args in (["--host", "0.0.0.0"], ["--host", "192.168.1.2", "--api-key", "short"]):
        with pytest.raises(SystemExit) as refused:
            main(["serve", *args, "--model", str(tiny_model), "--data", str(tmp_path / "never")])
        assert refused.value.code == 1
    err = capsys.readouterr().err
    assert "reachable from other machines: give --api-key" in err and "at least 16 characters" in err
    assert not (tmp_path / "never").exists()
    serve = ServeProcess(tmp_path / "data", [tiny_model], "--api-key", KEY).start()
    try:
        assert httpx.get(serve.url + "/health").status_code == 200
        assert httpx.get(serve.url + "/v1/models").status_code == 401
        assert httpx.get(serve.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(serve.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(serve.url + "/v1/models", headers={"X-API-Key": KEY}).json()["data"][0]["id"] == "tiny-ti2v"
        assert httpx.post(serve.url + "/v1/videos", json={"prompt": "x"}).status_code == 401
    finally:
        serve.stop()


def test_killed_server_loses_no_job_and_runs_none_twice(tiny_model, tmp_path):
    data = tmp_path / "data"
    serve = ServeProcess(data, [tiny_model]).start()
    client = httpx.Client(base_url=serve.url)
    body = {"size": "32x32", "frames": 5, "steps": 120}
    ids = [client.post("/v1/videos", json={**body, "prompt": f"job {i}", "seed": i}).json()["id"] for i in range(3)]
    wait_for(client, ids[0], lambda j: (j["mlxvid"]["step"] or 0) >= 2, every=0.02)
    state = sqlite3.connect(data / "jobs.sqlite3").execute("SELECT value FROM state WHERE name = 'worker'").fetchone()
    worker_pid = json.loads(state[0])["pid"]
    serve.kill()
    deadline = time.monotonic() + 30
    while pid_alive(worker_pid):  # the killed server's worker process stops at its next step
        assert time.monotonic() < deadline, "the worker outlived its server"
        time.sleep(0.05)
    serve = ServeProcess(data, [tiny_model]).start()
    try:
        client = httpx.Client(base_url=serve.url)
        jobs = [wait_for(client, job_id, finished, timeout=300) for job_id in ids]
        assert [j["status"] for j in jobs] == ["completed"] * 3
        for job in jobs:
            assert read_video(data / "videos" / f"{job['id']}.mp4").shape == (5, 32, 32, 3)
    finally:
        serve.stop()
    db = sqlite3.connect(data / "jobs.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    runs = dict(db.execute("SELECT id, runs FROM jobs").fetchall())
    assert runs == {ids[0]: 2, ids[1]: 1, ids[2]: 1}  # the interrupted job ran again; the others once


def test_s2v_job_api(tmp_path):
    """The S2V plan's API: multipart image + audio with X-API-Key; 401 without it; a job, its status, its video."""
    from support.wan_s2v import build_s2v_release, s2v_reference, write_wav

    (tmp_path / "s2v").mkdir()
    reference = s2v_reference()
    root = build_s2v_release(tmp_path / "s2v", reference)
    serve = ServeProcess(tmp_path / "data", [root / "mlx"], "--api-key", KEY).start()
    try:
        tensors, _, settings, _ = reference
        face = tmp_path / "face.png"
        Image.fromarray(tensors["image"]).save(face)
        voice = write_wav(tmp_path / "voice.wav", 1.0)
        files = {"image": ("face.png", face.read_bytes(), "image/png"), "audio": ("voice.wav", voice.read_bytes(), "audio/wav")}
        form = {"prompt": "a person talks", "num_clips": "1", "steps": "2", "frames": "12",
                "size": f"{settings['width']}x{settings['height']}"}
        assert httpx.post(serve.url + "/generate-video", data=form, files=files).status_code == 401
        headers = {"X-API-Key": KEY}
        bad = httpx.post(serve.url + "/generate-video", data={**form, "resolution": "4k"}, files=files, headers=headers)
        assert bad.status_code == 400 and "480p" in bad.json()["error"]["message"]
        answer = httpx.post(serve.url + "/generate-video", data=form, files=files, headers=headers)
        assert answer.status_code == 200, answer.text
        job = answer.json()
        assert job["status"] == "processing" and job["job_id"].startswith("video_")
        client = httpx.Client(base_url=serve.url, headers=headers)
        deadline = time.monotonic() + 120
        while (status := client.get(f"/status/{job['job_id']}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status["status"] == "completed", (status, client.get(f"/v1/videos/{job['job_id']}").json()["error"])
        video = client.get(status["video_url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        ranged = client.get(status["video_url"], headers={"Range": "bytes=0-99"})
        assert ranged.status_code == 206 and len(ranged.content) == 100
        path = tmp_path / "talk.mp4"
        path.write_bytes(video.content)
        with av.open(str(path)) as container:
            assert container.streams.audio, "the voice is muxed into the video"
    finally:
        serve.stop()
