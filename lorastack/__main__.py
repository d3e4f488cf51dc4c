from lorastack.cli import main

main()
