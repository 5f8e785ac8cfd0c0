"""lib/run_folder.py: the layout of a run folder and its run records."""

from lib import run_folder


def test_an_image_gives_a_probability_map_mask_and_footprints_under_their_folders(tmp_path):
    paths = run_folder.output_paths(tmp_path, "scene", "gpkg")
    assert paths == {"probability": tmp_path / "probabilities" / "scene.tif", "mask": tmp_path / "masks" / "scene.tif",
                     "geojson": tmp_path / "footprints" / "scene.geojson",
                     "vector": tmp_path / "footprints" / "scene.gpkg"}
    assert "vector" not in run_folder.output_paths(tmp_path, "scene", "geojson")
    assert "vector" not in run_folder.output_paths(tmp_path, "scene", None)


def test_a_run_is_a_folder_with_probability_maps_listed_by_stem(tmp_path):
    assert not run_folder.is_run(tmp_path)
    for stem in ("b", "a"):
        path = run_folder.output_paths(tmp_path, stem, None)["probability"]
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert run_folder.is_run(tmp_path)
    assert list(run_folder.probability_maps(tmp_path)) == ["a", "b"]


def test_run_records_round_trip_and_a_broken_or_missing_one_reads_as_empty(tmp_path):
    assert run_folder.read_run(tmp_path) == {}
    run_folder.write_record(run_folder.run_file(tmp_path), {"images": {"a": {"windows": 3}}})
    assert run_folder.read_run(tmp_path) == {"images": {"a": {"windows": 3}}}
    run_folder.rank_file(tmp_path, 1).write_text('{"images": ')  # a rank killed mid-write
    assert run_folder.rank_files(tmp_path) == [tmp_path / ".run.rank1.json"]
    assert run_folder.read_record(run_folder.rank_file(tmp_path, 1)) == {}


def test_rerun_reason_skips_only_finished_images_with_the_same_settings(tmp_path):
    out = tmp_path / "a.tif"
    settings = {"threshold": 0.5, "models": [{"sha256": "ab"}]}
    done = {"status": "done", "settings": settings, "fingerprint": run_folder.fingerprint(settings)}
    assert run_folder.rerun_reason(None, settings, [out]) == run_folder.NEW
    assert run_folder.rerun_reason(done, settings, [out]) == "a.tif missing"
    out.write_bytes(b"")
    assert run_folder.rerun_reason(None, settings, [out]) == "no record of its settings in run.json"
    assert run_folder.rerun_reason(done, dict(reversed(settings.items())), [out]) is None  # key order is not a change
    changed = {"threshold": 0.6, "models": [{"sha256": "cd"}]}
    assert run_folder.rerun_reason(done, changed, [out]) == "models changed, threshold changed (0.5 -> 0.6)"
    assert run_folder.rerun_reason({**done, "status": "failed"}, settings, [out]) == "it failed last time"
    assert run_folder.rerun_reason({"path": "x"}, settings, [out]) == "made before settings were recorded"
