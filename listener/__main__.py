from listener.cli import main

main()
