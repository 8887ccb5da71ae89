from gguf_serve.cli import main

main()
