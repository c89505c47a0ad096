import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import matplotlib.cbook
import pytest
import webdataset as wds
from PIL import Image
from pipeline.data.manifest import load_manifest
from pipeline.shards import convert, sources
from pipeline.data.__main__ import main as data_main
from pipeline.shards.__main__ import main as shards_main

from helpers import TRAIN_PER_CLASS, VAL_PER_CLASS, run_here, truncate_sample, write_tree


def read_all(manifest):
    return [(s["__key__"], int(s["cls"]), s["jpg"]) for s in wds.WebDataset(manifest.urls(), shardshuffle=False)]


def test_round_trip(image_tree, shard_dir):
    classes = sources.list_classes(image_tree)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        manifest = load_manifest(shard_dir, split)
        assert manifest.classes == classes
        assert manifest.num_samples == per_class * len(classes)
        assert manifest.shards[-1]["num_samples"] == (manifest.num_samples % 25 or 25)
        files = {sources.sample_key(str(p.relative_to(image_tree))): p for p in (image_tree / split).rglob("*.JPEG")}
        samples = read_all(manifest)
        assert len(samples) == manifest.num_samples
        assert len({k for k, _, _ in samples}) == len(samples)
        assert {k for k, _, _ in samples} == set(files)
        for key, label, jpg in samples:
            assert jpg == files[key].read_bytes()  # RGB JPEGs are copied untouched
            assert classes[label] == files[key].parent.name
        for entry in manifest.shards:
            assert hashlib.sha256((shard_dir / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]


def test_train_order_is_shuffled_and_reproducible(image_tree, shard_dir, tmp_path):
    samples = read_all(load_manifest(shard_dir, "train"))
    assert len({label for _, label, _ in samples[:25]}) > 3  # a class-sorted shard would hold one or two classes
    convert.convert(image_tree, tmp_path / "again", shard_samples=25)
    assert [k for k, _, _ in read_all(load_manifest(tmp_path / "again", "train"))] == [k for k, _, _ in samples]
    for split in ("train", "val"):  # byte-identical shards: the same checksums
        again = load_manifest(tmp_path / "again", split)
        assert again.shards == load_manifest(shard_dir, split).shards
    convert.convert(image_tree, tmp_path / "other seed", shard_samples=25, seed=1)
    assert [k for k, _, _ in read_all(load_manifest(tmp_path / "other seed", "train"))] != [k for k, _, _ in samples]


def test_shards_are_plain_ustar_without_per_member_pax_headers(shard_dir):
    """A PAX header per member (webdataset's default float mtime) doubles the header parsing per sample."""
    with tarfile.open(load_manifest(shard_dir, "val").urls()[0]) as tar:
        members = tar.getmembers()
    assert members and all(not m.pax_headers and m.mtime == 0 for m in members)


def test_odd_inputs_are_converted_or_skipped(tmp_path):
    root = write_tree(tmp_path / "src", train_per_class=2, val_per_class=1)
    folder = root / "train" / "00_tshirt_top"
    Image.new("L", (20, 20), 128).save(folder / "gray.JPEG", format="JPEG")
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(folder / "cmyk.JPEG", format="JPEG")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "png_in_disguise.JPEG", format="PNG")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, format="JPEG")
    (folder / "truncated.JPEG").write_bytes(good.getvalue()[:200])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "notes.JPEG").write_text("not an image")
    convert.convert(root, tmp_path / "out", shard_samples=4)
    manifest = load_manifest(tmp_path / "out", "train")
    skipped = {entry["path"].rsplit("/", 1)[1]: entry["reason"] for entry in manifest.skipped}
    assert set(skipped) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    assert skipped["empty.JPEG"] == "empty file"
    assert not any(" at 0x" in reason for reason in skipped.values())  # no memory addresses: reproducible
    assert manifest.num_samples == 2 * 10 + 3
    for _, _, jpg in read_all(manifest):
        with Image.open(io.BytesIO(jpg)) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")


def test_nested_folders_link_loops_and_stray_files_are_listed_as_skipped(tmp_path):
    """Nothing of the source tree is passed over silently: what the listing does not read is in the
    manifest's skipped list with the reason."""
    root = write_tree(tmp_path / "src", train_per_class=2, val_per_class=1)
    folder = root / "train" / "00_tshirt_top"
    (folder / "more").mkdir()
    shutil.copy(next(folder.glob("*.JPEG")), folder / "more" / "hidden.JPEG")
    (folder / "loop.JPEG").symlink_to(folder / "loop.JPEG")
    (folder / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    (root / "train" / "README.txt").write_text("a file beside the class folders")
    (root / "train" / "cycle").symlink_to(root / "train" / "cycle")
    os.mkfifo(root / "val" / "00_tshirt_top" / "fifo")
    convert.convert(root, tmp_path / "out", shard_samples=4)
    skipped = {entry["path"]: entry["reason"] for split in ("train", "val")
               for entry in load_manifest(tmp_path / "out", split).skipped}
    assert skipped == {
        "train/00_tshirt_top/more": "a folder where images are expected: its files are not read; move them up a level",
        "train/00_tshirt_top/loop.JPEG": "a symbolic link that leads nowhere (Too many levels of symbolic links)",
        "train/00_tshirt_top/gone.JPEG": "a symbolic link that leads nowhere (No such file or directory)",
        "train/README.txt": "a file where class folders are expected",
        "train/cycle": "a symbolic link that leads nowhere (Too many levels of symbolic links)",
        "val/00_tshirt_top/fifo": "not a regular file",
    }
    assert load_manifest(tmp_path / "out", "train").num_samples == 2 * 10


def test_rerun_keeps_finished_shards(image_tree, shard_dir, capsys):
    before = (shard_dir / "train.json").read_text()
    convert.convert(image_tree, shard_dir, shard_samples=25)
    assert capsys.readouterr().err.count("(0 shards written now)") == 2
    assert (shard_dir / "train.json").read_text() == before


def test_a_rerun_converts_files_added_since(tmp_path):
    root = write_tree(tmp_path / "src", train_per_class=2, val_per_class=1)
    convert.convert(root, tmp_path / "out", shard_samples=4)
    shutil.copy(next((root / "train" / "01_trouser").iterdir()), root / "train" / "01_trouser" / "added.JPEG")
    convert.convert(root, tmp_path / "out", shard_samples=4)
    convert.convert(root, tmp_path / "fresh", shard_samples=4)
    assert manifests(tmp_path / "out") == manifests(tmp_path / "fresh")
    assert load_manifest(tmp_path / "out", "train").num_samples == 21


def test_force_with_new_settings_keeps_nothing_of_the_old_conversion(tmp_path):
    root = write_tree(tmp_path / "src", train_per_class=2, val_per_class=1)
    convert.convert(root, tmp_path / "out", shard_samples=4)
    convert.convert(root, tmp_path / "out", shard_samples=4, max_side=16, force=True)
    for split in ("train", "val"):
        manifest = load_manifest(tmp_path / "out", split)
        assert json.loads(manifest.path.read_text())["mode"] == "max_side=16"
        assert all(max(Image.open(io.BytesIO(jpg)).size) == 16 for _, _, jpg in read_all(manifest))


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert shards_main(["convert", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere/train does not exist" in capsys.readouterr().err
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    (tmp_path / "src" / "val" / "b").mkdir(parents=True)
    (tmp_path / "src" / "train" / "a" / "x.JPEG").write_bytes(b"x")
    (tmp_path / "src" / "val" / "b" / "y.JPEG").write_bytes(b"y")
    assert shards_main(["convert", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "class 'b' is not a class folder" in capsys.readouterr().err


def test_manifest_missing_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m pipeline.shards convert"):
        load_manifest(tmp_path, "train")


def test_manifest_is_json_with_the_documented_fields(shard_dir):
    raw = json.loads((shard_dir / "val.json").read_text())
    assert {"split", "num_samples", "classes", "shards", "skipped"} <= set(raw)
    assert set(raw["shards"][0]) == {"name", "num_samples", "sha256"}


def test_verify_passes_good_shards_and_names_a_flipped_byte(shard_dir, tmp_path, capsys):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    assert shards_main(["verify", str(copy), "--deep"]) == 0
    assert "240 samples checked against" in capsys.readouterr().err
    shards = [copy / entry["name"] for entry in load_manifest(copy, "train").shards]
    for shard in shards[4], shards[7]:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    before = {shard: shard.stat().st_mtime_ns for shard in shards}
    assert shards_main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"error: {shards[4]}: sha256" in err and f"{shards[7]}: sha256" in err and "2 damaged shards" in err
    command = err.split("rewrite exactly those with: ")[1].strip()
    assert command.endswith("--recheck") and "--shard-samples 25" in command
    repaired = subprocess.run(command.replace("python", shlex.quote(sys.executable), 1), shell=True,
                              capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stderr
    assert [shard for shard in shards if shard.stat().st_mtime_ns != before[shard]] == [shards[4], shards[7]]
    assert shards_main(["verify", str(copy)]) == 0


def test_deep_verify_decodes_every_image(tmp_path, capsys):
    """A shard whose bytes match the manifest but holds an undecodable JPEG: only --deep sees it."""
    out = tmp_path / "shards"
    root = write_tree(tmp_path / "src", train_per_class=1, val_per_class=1)
    convert.convert(root, out, shard_samples=4)
    manifest = json.loads((out / "val.json").read_text())
    path = out / manifest["shards"][0]["name"]
    key = truncate_sample(path, index=1, keep=300)
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "val.json").write_text(json.dumps(manifest))
    assert shards_main(["verify", str(out)]) == 0
    assert shards_main(["verify", str(out), "--deep"]) == 1
    assert f"{path}: sample {key!r} is not a decodable image" in capsys.readouterr().err


def test_verify_without_shards_says_how_to_make_them(tmp_path, capsys):
    assert shards_main(["verify", str(tmp_path)]) == 2
    assert "python -m pipeline.shards convert" in capsys.readouterr().err


def manifests(out):
    return [json.loads((out / f"{split}.json").read_text()) for split in ("train", "val")]


def test_parallel_and_array_task_conversions_equal_the_serial_one(image_tree, tmp_path):
    convert.convert(image_tree, tmp_path / "serial", shard_samples=7)
    convert.convert(image_tree, tmp_path / "parallel", shard_samples=7, workers=2)
    for task in range(3):  # three array tasks, then the merging run
        convert.convert(image_tree, tmp_path / "tasks", shard_samples=7, task=(task, 3))
    assert not (tmp_path / "tasks" / "train.json").exists()
    convert.convert(image_tree, tmp_path / "tasks", shard_samples=7)
    want = manifests(tmp_path / "serial")
    assert manifests(tmp_path / "parallel") == want and manifests(tmp_path / "tasks") == want


@pytest.mark.slow
def test_a_killed_conversion_resumes_to_the_same_manifest(image_tree, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.shards", "convert", "--src", str(image_tree), "--out", str(out),
           "--shard-samples", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list((out / ".parts").glob("train-*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "train.json").exists()  # killed mid-way: there is something to resume
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar") if (out / ".parts" / f"{p.name}.json").exists()}
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())  # kept, not rewritten
    convert.convert(image_tree, tmp_path / "whole", shard_samples=2)
    assert manifests(out) == manifests(tmp_path / "whole")
    assert not list(out.glob(".*.partial"))


def test_a_folder_of_another_conversion_is_refused(image_tree, shard_dir, tmp_path, capsys):
    assert shards_main(["convert", "--src", str(image_tree), "--out", str(shard_dir), "--shard-samples", "30"]) == 2
    assert "holds shards of another conversion (shard_samples: 25 -> 30)" in capsys.readouterr().err


def test_a_full_disk_stops_without_a_half_written_shard(image_tree, tmp_path):
    disk = tmp_path / "small disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], check=True)
    try:
        with pytest.raises(OSError, match="the disk is full .*rerun the same command: finished shards are kept"):
            convert.convert(image_tree, disk / "out", shard_samples=25)
        assert not list((disk / "out").glob(".*.partial"))
        records = {p.name[:-5] for p in (disk / "out" / ".parts").glob("train-*.json")}
        assert records and records == {p.name for p in (disk / "out").glob("train-*.tar")}
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def flat_val_tree(image_tree, root):
    """train/ linked from image_tree, val/ flattened into one folder, and the class of each val file."""
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(image_tree / "train")
    labels = {}
    for f in sorted((image_tree / "val").rglob("*.JPEG")):
        shutil.copy(f, root / "val" / f.name)
        labels[f.name] = f.parent.name
    return labels


def test_flat_val_with_the_devkits_csv_or_a_two_column_list(image_tree, shard_dir, tmp_path):
    labels = flat_val_tree(image_tree, tmp_path / "src")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(name).stem},{cls} 1 2 30 40 {cls} 5 6 7 8\n" for name, cls in reversed(labels.items())))
    listing = tmp_path / "val labels.txt"
    listing.write_text("".join(f"{name} {cls}\n" for name, cls in labels.items()))
    want = sorted((label, jpg) for _, label, jpg in read_all(load_manifest(shard_dir, "val")))
    for i, labels_file in enumerate((csv, listing)):
        out = tmp_path / f"out{i}"
        convert.convert(tmp_path / "src", out, shard_samples=25, val_labels=labels_file)
        assert sorted((label, jpg) for _, label, jpg in read_all(load_manifest(out, "val"))) == want


def test_flat_val_label_errors_name_the_file(image_tree, tmp_path, capsys):
    labels = flat_val_tree(image_tree, tmp_path / "src")
    first, *rest = labels.items()
    listing = tmp_path / "labels.txt"
    listing.write_text("".join(f"{name} {cls}\n" for name, cls in rest))
    args = ["convert", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--val-labels", str(listing)]
    assert shards_main(args) == 2
    assert f"{first[0]}: no label in {listing}" in capsys.readouterr().err
    listing.write_text("".join(f"{name} n99999999\n" for name, _ in labels.items()))
    assert shards_main(args) == 2
    assert "has class 'n99999999', which is not a class folder" in capsys.readouterr().err
    assert shards_main(args[:-2]) == 2
    assert "a flat val/ needs --val-labels FILE" in capsys.readouterr().err


def test_max_side_reencodes_only_larger_images(tmp_path):
    root = write_tree(tmp_path / "src", train_per_class=1, val_per_class=1)
    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    shutil.copy(photo, root / "train" / "00_tshirt_top" / "big.JPEG")
    convert.convert(root, tmp_path / "out", shard_samples=4, max_side=100)
    manifest = load_manifest(tmp_path / "out", "train")
    raw = json.loads(manifest.path.read_text())
    assert raw["mode"] == "max_side=100"
    samples = {key: jpg for key, _, jpg in read_all(manifest)}
    big = Image.open(io.BytesIO(samples.pop("train_00_tshirt_top_big")))
    assert big.size == (85, 100)  # 512x600 scaled to a longer side of 100, aspect kept
    files = {sources.sample_key(str(p.relative_to(root))): p.read_bytes() for p in (root / "train").rglob("*.JPEG")}
    assert all(jpg == files[key] for key, jpg in samples.items())  # 28 px images copied untouched


@pytest.mark.slow
def test_the_array_job_script_converts_in_tasks_then_merges(image_tree, shard_dir, tmp_path):
    """slurm/shards.sbatch run as Slurm would: three array tasks (ids 1, 3, 5), then once without an array."""
    script = Path(__file__).resolve().parent.parent / "slurm" / "shards.sbatch"
    out = tmp_path / "out dir"
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_CPUS_PER_TASK": "2"}
    for task_id in (1, 3, 5):  # --array=1-5:2
        array = {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
                 "SLURM_ARRAY_TASK_COUNT": "3"}
        done = subprocess.run(["bash", str(script), str(image_tree), str(out), "--shard-samples", "25"],
                              env={**env, **array}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"task {(task_id - 1) // 2} of 3" in done.stderr and not (out / "train.json").exists()
    merged = subprocess.run(["bash", str(script), str(image_tree), str(out), "--shard-samples", "25"], env=env,
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert "(0 shards written now)" in merged.stderr
    assert manifests(out) == manifests(shard_dir)


def test_an_output_folder_inside_the_source_tree_is_refused(tmp_path):
    """A second run would read the shards as a class folder: every label would shift by one."""
    root = write_tree(tmp_path / "src", train_per_class=1, val_per_class=1)
    for out in (root / "train" / "shards", root, tmp_path):
        with pytest.raises(ValueError, match=f"--out {out} and --src {root} overlap"):
            convert.convert(root, out)
    assert not (root / "train" / "shards").exists()


def test_two_files_with_one_sample_key_are_both_named(tmp_path):
    root = write_tree(tmp_path / "src", train_per_class=1, val_per_class=1)
    folder = root / "train" / "01_trouser"
    first = next(folder.iterdir())
    (folder / first.name.replace("_", " ")).write_bytes(first.read_bytes())
    with pytest.raises(ValueError) as err:
        convert.convert(root, tmp_path / "out")
    assert str(folder / first.name.replace("_", " ")) in str(err.value) and str(first) in str(err.value)


def test_manifests_and_index_are_readable_by_the_other_users_of_a_shared_folder(shard_dir):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("train.json", "val.json", "train.index.npy"):
        assert (shard_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("text, message", [
    ('{"split": "train", "num_sam', "is not valid JSON"),
    ("[1, 2]", "is not a shard manifest: it lacks every key"),
    ('{"split": "train", "num_samples": 3, "classes": [], "skipped": []}', "it lacks shards"),
    ('{"split": "train", "num_samples": 3, "classes": [], "skipped": [], "shards": [{"name": "a.tar"}]}',
     "a shard entry lacks its name or num_samples"),
])
def test_a_broken_manifest_is_named_with_what_is_wrong(tmp_path, text, message, capsys):
    (tmp_path / "train.json").write_text(text)
    for command in (["verify", str(tmp_path)], ["index", str(tmp_path)]):
        assert shards_main(command) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'train.json'}" in err and message in err and "python -m pipeline.shards convert" in err
    inspect = run_here(data_main, capsys, "inspect", "--shards", str(tmp_path))
    assert inspect.returncode == 2 and message in inspect.stderr
