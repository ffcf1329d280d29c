"""spineseg: segment spine T2 MRI (background, disc, vertebra) with TensorFlow."""
import setuptools

setuptools.setup(
    name="spineseg",
    version="0.1.0",
    description="Spine T2 MRI segmentation: convert -> train -> export -> serve.",
    python_requires=">=3.11",
    packages=["data_prep", "trainer", "export"],
    # The model that ships with spineseg (export/pretrained.py, MODEL_CARD.md beside it).
    package_data={"export": ["pretrained_model/*"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "numpy>=1.26",
        "nibabel>=5.2",
        "absl-py>=2.1",
        "pillow>=10.0",
        "scipy>=1.11",  # scipy.ndimage: distance transforms for the HD95 metric
        "tensorboard>=2.21,<2.22",  # to view the training logs
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3",
                             # drives Debian's chromium + chromedriver: tests/page_check.py
                             "selenium>=4.10",
                             "SimpleITK>=2.2",  # so CI runs tests/test_dicom.py
                             "highdicom>=0.22",  # and tests/test_dicom_seg.py
                             "apache-beam>=2.60",  # and tests/test_beam_convert.py
                             # and tests/test_export_onnx.py
                             "tf2onnx>=1.17", "onnxruntime>=1.17",
                             "ai-edge-litert>=2.0"],  # and tests/test_export_litert.py
                    # DICOM series input of spine-predict (data_prep/dicom.py)
                    "dicom": ["SimpleITK>=2.2"],
                    # spine-predict --output_format=dicom_seg (export/dicom_seg.py)
                    "dicom_seg": ["highdicom>=0.22", "SimpleITK>=2.2"],
                    # spine-convert --runner: the converter on Beam (data_prep/beam_convert.py)
                    "beam": ["apache-beam>=2.60"],
                    # spine-export --onnx (export/portable.py); onnxruntime runs model.onnx
                    "onnx": ["tf2onnx>=1.17", "onnxruntime>=1.17"],
                    # spine-export --litert (export/portable.py); its interpreter runs it
                    "litert": ["ai-edge-litert>=2.0"]},
    # The ONE list of binaries: tools/bazel/gen_build.py reads it (with `ast`) for BUILD's
    # py_binary targets, so keep it a literal.
    entry_points={
        "console_scripts": [
            "spine-convert=data_prep.convert:run",
            "spine-train=trainer.main:run",
            "spine-export=export.export_saved_model:run",
            "spine-predict=export.predict:run",
            "spine-evaluate=export.evaluate:run",
            "spine-phantom=data_prep.phantom:run",
            "spine-inspect=data_prep.inspect_data:run",
        ]
    },
)
