"""Upload a converted model directory to the Hugging Face Hub."""

from pathlib import Path


def upload(path: Path, repo: str):
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    except Exception as e:  # network, credentials, hub: any of them leaves the model written
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(
            f"uploading to {repo} failed ({first.strip()}); the converted model is kept in "
            f"{path}: upload it later with `hf upload {repo} {path}`"
        ) from e
    print(f"[INFO] uploaded to https://huggingface.co/{repo}")
