"""Static checks of the QuPath Groovy scripts, which need no QuPath.

The scripts cannot run without QuPath, so these tests check them from outside.
They check the layout of QuPath scripts and that the shared rules are the same
in both scripts and in results.py. They parse the command line the classify
script builds with the real CLI parser, and compare the GeoJSON the scripts read
with what the classify pipeline writes. Where a ``groovy`` executable is
installed, they also check that both scripts parse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nuclass_qupath.qupath import results
from qupath_results_fixtures import STAND_IN_CLASSES, STAND_IN_MODEL_ID, area_stand_in_predictions, load_export

GROOVY_DIR = Path(__file__).resolve().parents[1] / "groovy"
SCRIPTS = ["classify_current_image.groovy", "import_batch_results.groovy"]
SHARED_BLOCK = re.compile(r"// BEGIN shared rules.*?// END shared rules", re.DOTALL)
PARAMETER = re.compile(r"^(String|double|int|boolean) (\w+) = .+$")
FIELD = re.compile(r'^@Field final String (\w+) = "([^"]*)"$', re.MULTILINE)

# Groovy field name -> the constant of results.py it mirrors.
MIRRORED_CONSTANTS = {
    "MEASUREMENT_PREFIX": results.MEASUREMENT_PREFIX,
    "TILE_NAME": results.TILE_NAME,
    "TILE_CELLS_MEASUREMENT": results.TILE_CELLS_MEASUREMENT,
    "METADATA_MODEL_KEY": results.METADATA_MODEL_KEY,
    "METADATA_VERSION_KEY": results.METADATA_VERSION_KEY,
    "RESULTS_DIR_NAME": results.RESULTS_DIR_NAME,
    "RESULTS_SUFFIX": results.RESULTS_SUFFIX,
}


def _text(name: str) -> str:
    return (GROOVY_DIR / name).read_text(encoding="utf-8")


def _main_body(text: str) -> list[str]:
    """Return the script lines from the parameters to the first method definition."""
    lines = text.splitlines()
    start = lines.index("// Parameters")
    end = next(i for i, line in enumerate(lines) if line.startswith(("/**", "// BEGIN shared rules")))
    return lines[start:end]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_header_documents_use(name):
    text = _text(name)
    assert text.startswith("/*\n")
    header = text[: text.index("*/")]
    assert "Parameters" in header
    assert "Output" in header
    assert "QuPath versions: 0.5 and 0.6" in header
    assert "Run for project" in header


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parameters_typed_at_top(name):
    body = _main_body(_text(name))
    parameters = []
    for line in body[1:]:
        if not line.strip():
            break
        match = PARAMETER.match(line)
        assert match, f"untyped or malformed parameter line: {line!r}"
        parameters.append(match.group(2))
    assert parameters
    header = _text(name)[: _text(name).index("*/")]
    for parameter in parameters:
        assert parameter in header, f"parameter {parameter} is not described in the header"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_steps_have_comments(name):
    body = "\n".join(_main_body(_text(name)))
    steps = [block for block in re.split(r"\n\s*\n", body) if block.strip()]
    assert len(steps) >= 4
    for step in steps:
        first = step.strip().splitlines()[0].strip()
        assert first.startswith("//"), f"step without a comment: {first!r}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_errors_are_clear_exceptions(name):
    text = _text(name)
    throws = re.findall(r"throw new (\w+)\((.*)", text)
    assert throws
    for exception, message in throws:
        assert exception in ("IllegalArgumentException", "IllegalStateException")
        assert len(message) > 30, f"short error message: {message!r}"
    assert "Dialogs." not in text
    assert "getCurrentImageData()" in text


def test_shared_rules_identical_in_both_scripts():
    blocks = [SHARED_BLOCK.search(_text(name)) for name in SCRIPTS]
    assert all(blocks)
    assert blocks[0].group(0) == blocks[1].group(0)


def test_shared_constants_match_results_module():
    block = SHARED_BLOCK.search(_text(SCRIPTS[0])).group(0)
    fields = dict(FIELD.findall(block))
    for name, value in MIRRORED_CONSTANTS.items():
        assert fields.get(name) == value, f"{name} differs from results.py"


def test_shared_rules_read_qupath_geojson_keys():
    block = SHARED_BLOCK.search(_text(SCRIPTS[0])).group(0)
    for key in ('"features"', '"properties"', '"objectType"', '"tile"', '"id"', '"measurements"',
                '"classification"', '"names"', '"color"', '"model"', '"model_id"', '"version"'):
        assert key in block, f"the shared rules do not read {key}"
    assert "getId()" in block


def test_results_file_name_rule_matches_python():
    block = SHARED_BLOCK.search(_text(SCRIPTS[0])).group(0)
    assert "replaceAll('[/\\\\\\\\:]', '_')" in block
    assert results.results_file_name("a/b\\c:d ") == "a_b_c_d.nuclass.geojson"
    suffixes = re.search(r'for \(String suffix : \[(.*?)\]\)', block).group(1)
    assert [s.strip().strip('"') for s in suffixes.split(",")] == [".geojson.gz", ".json.gz", ".geojson", ".json", ".gz"]


def _classify_options(text: str) -> list[str]:
    command = text[text.index("List<String> command = [") : text.index("runNuclass(command)")]
    return re.findall(r'"(--?[a-z][a-z-]*)"', command)


def test_classify_command_parses_with_cli():
    cli = pytest.importorskip("nuclass_qupath.cli")
    parser = cli.build_parser()
    options = _classify_options(_text(SCRIPTS[0]))
    assert set(options) == {"--cells", "-o", "--metadata", "--mpp", "--heatmap-um", "--model"}
    argv = ["classify", "slide.svs"]
    for option in options:
        argv += [option, "1"]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"nuclass-qupath rejects the arguments the Groovy script passes: {argv} ({exc})")
    assert args.command == "classify"
    assert args.heatmap_um == 1.0
    assert args.mpp == 1.0


@pytest.mark.slow
def test_classify_output_matches_script_expectations(shared_data, tmp_path):
    geojson = pytest.importorskip("nuclass_qupath.cells.geojson")
    output = pytest.importorskip("nuclass_qupath.engine.output")
    predictions_module = pytest.importorskip("nuclass_qupath.engine.predictions")
    config_module = pytest.importorskip("nuclass_qupath.model.config")
    from nuclass_qupath.qupath.heatmap import heatmap_tiles

    export = shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson"
    cells = geojson.read_cells_geojson(export)
    own_table, _ = results.features_to_cell_table(load_export(shared_data, "cmu1_cells", "CMU-1-Small-Region.svs"))
    assert cells.ids == own_table.ids

    probs, _, gate = area_stand_in_predictions(own_table)
    names = [name for name, _ in STAND_IN_CLASSES]
    predictions = predictions_module.Predictions(names, probs, gate, probs.copy(), probs.copy())
    config = config_module.ModelConfig(
        model_id=STAND_IN_MODEL_ID,
        classes=[config_module.ClassSpec(name=name, color=color) for name, color in STAND_IN_CLASSES],
    )
    path = tmp_path / "CMU-1-Small-Region.svs.nuclass.geojson"
    with geojson.GeoJSONWriter(path) as writer:
        for feature in output.prediction_features(cells, predictions, config):
            writer.write(feature)
        for tile in heatmap_tiles(
            cells.centroids_px, probs, names, probs.max(axis=1),
            mpp=0.499, image_width_px=2220, image_height_px=2967,
        ):
            writer.write(tile)
    written = json.loads(path.read_text(encoding="utf-8"))["features"]

    read_back = results.results_from_features(written)
    assert set(read_back) == set(cells.ids)
    expected = results.results_from_predictions(cells.ids, names, probs, probs.max(axis=1), gate=gate)
    first = cells.ids[0]
    assert read_back[first].class_name == expected[first].class_name
    assert set(read_back[first].measurements) == set(expected[first].measurements)
    for name, value in expected[first].measurements.items():
        assert read_back[first].measurements[name] == pytest.approx(value, abs=1e-4)
    cell_features = [f for f in written if f["properties"]["objectType"] != "tile"]
    assert all(isinstance(f["properties"]["classification"]["color"], list) for f in cell_features)
    tiles = [f for f in written if f["properties"]["objectType"] == "tile"]
    assert tiles
    assert all(results.is_nuclass_tile(f) for f in tiles)


def test_run_metadata_name_matches_pipeline():
    pipeline = pytest.importorskip("nuclass_qupath.pipeline")
    for name in ("X.svs.nuclass.geojson", "slide.geojson.gz", "out.json"):
        request = pipeline.ClassifyRequest(slide_path=Path("slide.svs"), output_path=Path("results") / name)
        assert results.run_metadata_path(Path("results") / name) == request.resolved_metadata_path()


def _java_home() -> str | None:
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    java = shutil.which("java")
    return str(Path(java).resolve().parents[1]) if java else None


@pytest.mark.slow
def test_scripts_parse_with_groovy(tmp_path):
    groovy = shutil.which("groovy")
    if groovy is None:
        pytest.skip("groovy is not installed (Debian package 'groovy'); syntax not checked")
    checker = tmp_path / "parse.groovy"
    checker.write_text(
        "import org.codehaus.groovy.control.*\n"
        "def failed = false\n"
        "args.each { path ->\n"
        "    def unit = new CompilationUnit()\n"
        "    unit.addSource(new File(path))\n"
        "    try { unit.compile(Phases.CONVERSION) } catch (CompilationFailedException e) {\n"
        "        println e.message; failed = true }\n"
        "}\n"
        "System.exit(failed ? 1 : 0)\n",
        encoding="utf-8",
    )
    env = dict(os.environ)
    if _java_home():
        env["JAVA_HOME"] = _java_home()
    paths = [str(GROOVY_DIR / name) for name in SCRIPTS]
    completed = subprocess.run(
        [groovy, str(checker), *paths], capture_output=True, text=True, env=env, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_stand_in_probabilities_are_distributions(shared_data):
    table, _ = results.features_to_cell_table(load_export(shared_data, "cmu1_cells", "CMU-1-Small-Region.svs"))
    probs, confidence, _ = area_stand_in_predictions(table)
    assert probs.shape == (3802, 3)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert len(set(probs.argmax(axis=1).tolist())) == 3
    assert (confidence >= 1 / 3).all()
