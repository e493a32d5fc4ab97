"""``nuclass-qupath calibrate``: fit temperatures on labelled validation cells and write a calibrated model."""

from __future__ import annotations

import argparse
from pathlib import Path

from nuclass_qupath.cli.evaluate import add_data_arguments, check_data_arguments, labelled_crops


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit calibration temperatures on labelled validation cells and write a calibrated model",
        description=(
            "Fit one temperature each for the local path, the global path and the gated prediction, by "
            "minimising the negative log-likelihood of the labelled cells in --labels (QuPath GeoJSON or x,y,class "
            "CSV named after the images in --images) or in the --groups of a training-set store. Use cells the "
            "model was not trained on. Writes a new model "
            "(OUTPUT.safetensors and OUTPUT.json) whose 'NuClass: confidence' is calibrated; the input model is "
            "left unchanged unless OUTPUT names it. Prints the expected calibration error and NLL before (with the "
            "model's temperatures until now, 1.0 if it was never calibrated) and after (with the fitted ones)."
        ),
    )
    parser.add_argument("--model", type=Path, help="model .safetensors file (default: the bundled demonstration model)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="calibrated model path (.safetensors or a name)")
    add_data_arguments(parser, "validation")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from nuclass_qupath.model.calibration import fit_temperatures
    from nuclass_qupath.model.io import load_model, save_model

    check_data_arguments(args, "validation")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    crops, _, _ = labelled_crops(args, model, "validation")
    print(f"calibration cells per class: {crops.class_counts()}")

    result = fit_temperatures(model, crops)
    model.config.training["calibration"] = result.as_dict()
    weights_path, config_path = save_model(model, args.output)

    print(result.format_table())
    print(f"calibrated model written to {weights_path} (configuration {config_path})")
    return 0
