"""Publish a trained MoCo model on the Hugging Face Hub (thin command line over `moco_hf.hub`).

    # look first: write exactly the files that would be uploaded, upload nothing (no token needed)
    python push_to_hub.py --model_dir outputs/moco-v2-r50-in1k/final --repo_id USER/moco-v2-resnet50 --dry_run staged/

    # upload (token from --token, HF_TOKEN, or a stored `hf auth login`)
    python push_to_hub.py --model_dir outputs/moco-v2-r50-in1k/final --repo_id USER/moco-v2-resnet50
    python push_to_hub.py --model_dir outputs/moco-v2-r50-in1k/final --repo_id USER/moco-v2-resnet50 --private \\
        --revision ep200 --commit_message "200 epochs"

    # a run converted from the official facebookresearch/moco code
    python -m moco_hf.convert_official --checkpoint moco_v2_800ep_pretrain.pth.tar --output_dir moco_v2_800ep
    python push_to_hub.py --model_dir moco_v2_800ep --repo_id USER/moco-v2-800ep-resnet50

Two repositories are written: USER/NAME (MoCo model: AutoModel with trust_remote_code, model card, image
processor, and the timm-format backbone in backbone/) and USER/NAME-timm (that backbone at the repository root,
because `timm.create_model("hf-hub:...")` reads only repository roots). --backbone_repo_id names the second one,
--no_backbone_repo skips it. See moco_hf/hub.py for the layout.
"""

import argparse
import os
import sys

# moco_hf (torch, timm, transformers) is imported once the arguments are known to be good.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="folder written by save_pretrained (e.g. OUT/final)")
    parser.add_argument("--repo_id", required=True, help="USER/NAME or ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repositories as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing); default main")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN, then the stored login)")
    parser.add_argument(
        "--backbone_repo_id", default=None, help="timm-format backbone repository (default REPO_ID-timm)"
    )
    parser.add_argument("--no_backbone_repo", action="store_true", help="upload only REPO_ID (backbone/ stays in it)")
    parser.add_argument("--license", default="apache-2.0", help="model card license (default apache-2.0)")
    parser.add_argument("--dataset", action="append", default=None, help="Hub dataset id for the card (repeatable)")
    parser.add_argument(
        "--dry_run", metavar="DIR", default=None, help="stage the files that would be uploaded into DIR; upload nothing"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or MOCO_HF_DEBUG=1)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("MOCO_HF_DEBUG", "") not in ("", "0")
    from moco_hf.cli import run_command
    from moco_hf.hub import HubError

    try:
        return run_command("push_to_hub.py", lambda: publish(args), debug=debug)
    except HubError as e:  # the expected failures (bad folder, no token, refused upload): one line, token redacted
        if debug:
            raise
        print(f"push_to_hub.py: error: {e}", file=sys.stderr)
        return 1


def publish(args: argparse.Namespace) -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    from moco_hf.hub import push, stage

    disable_progress_bars()  # this script prints its own summary
    transformers_logging.disable_progress_bar()
    if args.dry_run is not None:
        files = stage(
            args.model_dir, args.dry_run, args.repo_id, backbone_repo_id=args.backbone_repo_id,
            license=args.license, datasets=args.dataset, token=args.token,
        )
        print(f"dry run: staged {len(files)} files in {args.dry_run} for {args.repo_id}; nothing uploaded")
        for name in files:
            print(f"  {name}")
        if not args.no_backbone_repo:
            target = args.backbone_repo_id or f"{args.repo_id}-timm"
            print(f"  (backbone/ would also be uploaded to the root of {target})")
        return
    result = push(
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
        backbone_repo_id=args.backbone_repo_id,
        push_backbone=not args.no_backbone_repo,
        license=args.license,
        datasets=args.dataset,
    )
    print(f"uploaded {len(result.files)} files to https://huggingface.co/{result.repo_id}")
    if result.backbone_repo_id:
        print(f"uploaded the timm backbone to https://huggingface.co/{result.backbone_repo_id}")
    for url in result.commit_urls:
        print(f"  commit: {url}")


if __name__ == "__main__":
    sys.exit(main())
