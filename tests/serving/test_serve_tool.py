"""tools/serve.py before it serves: a missing index is a clear error, --build-index builds it."""

import pytest

from tests.common import load_tool, make_cfg


def _serve_module():
    return load_tool("serve")


def _args(serve, argv):
    return serve.get_parser().parse_args(argv)


def test_parser_defaults_bind_loopback():
    args = _args(_serve_module(), ["--config-file", "x.yaml", "MODEL.DEVICE", "cpu"])
    assert (args.host, args.port, args.build_index) == ("127.0.0.1", 8000, False)
    assert args.opts == ["MODEL.DEVICE", "cpu"]
    assert args.max_upload_mb == 20.0


def test_missing_index_names_it_and_says_how_to_build_it(ui_index, tmp_path):
    serve = _serve_module()
    cfg = make_cfg(ui_index.config_file, ui_index.opts + ["RETRIEVAL.INDEX_DIR", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        serve.build_service(cfg, _args(serve, []))
    message = str(info.value)
    assert str(tmp_path) in message and "--build-index" in message


def test_build_index_flag_builds_then_serves(ui_index, tmp_path):
    serve = _serve_module()
    index_dir = tmp_path / "index"
    cfg = make_cfg(ui_index.config_file, ui_index.opts + ["RETRIEVAL.INDEX_DIR", str(index_dir)])
    service = serve.build_service(cfg, _args(serve, ["--build-index", "--max-upload-mb", "1"]))
    assert (index_dir / "manifest.json").is_file()
    images = sorted(p.stem for p in (ui_index.root / "images").iterdir())
    assert sorted(i.split("/")[-1] for i in service.image_ids) == images
    assert service.max_upload_bytes == 2**20
