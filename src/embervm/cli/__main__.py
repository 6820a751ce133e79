from embervm.cli import main

main()
