"""Packaging for nextchat.

The repository keeps each part of the model in its own top-level folder (the user's layout), but the
installed distribution exposes a single import namespace, ``nextchat``: ``package_dir`` maps the
folders below it so that nothing generic such as ``configuration`` lands in site-packages.
"""

from setuptools import setup

setup(
    name="nextchat",
    version="0.1.0",
    description="NExT-Chat (pix2emb) as a Hugging Face-native model: chat, grounding boxes and SAM masks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "nextchat",
        "nextchat.configuration",
        "nextchat.processing",
        "nextchat.convert_scripts",
        "nextchat.training",
        "nextchat.evaluation",
        "nextchat.demo",
    ],
    package_dir={
        "nextchat": "modeling_nextchat",
        "nextchat.configuration": "configuration",
        "nextchat.processing": "processing",
        "nextchat.convert_scripts": "convert_scripts",
        "nextchat.training": "training",
        "nextchat.evaluation": "evaluation",
        "nextchat.demo": "demo",
    },
    include_package_data=True,
    package_data={"nextchat.training": ["configs/*.json", "README.md"]},
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "transformers>=5.24,<6",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "segment-anything>=1.0",
        "accelerate>=1.0",
        "peft>=0.17",
        "pillow>=10",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "tqdm>=4.60",
    ],
    extras_require={
        "eval": ["pycocoevalcap>=1.2", "pycocotools>=2.0.6"],
        "demo": ["gradio>=6.0,<7"],
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "parameterized>=0.9",  # imported by transformers' common tests (tests/test_transformers_common.py)
            "pycocoevalcap>=1.2",
            "pycocotools>=2.0.6",
            "gradio>=6.0,<7",
            "playwright>=1.50",
        ],
    },
    entry_points={
        "console_scripts": [
            "nextchat-quickstart=nextchat.quickstart:main",
            "nextchat-convert=nextchat.convert_scripts.convert_original_nextchat:main",
            "nextchat-train=nextchat.training.train:main",
            "nextchat-finetune=nextchat.training.finetune:main",
            "nextchat-merge=nextchat.training.merge:main",
            "nextchat-eval=nextchat.evaluation.cli:main",
            "nextchat-chat=nextchat.demo.chat_cli:main",
            "nextchat-demo=nextchat.demo.web:main",
        ],
    },
)
