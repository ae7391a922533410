from onnxcam.cli import main

main()
