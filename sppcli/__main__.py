from sppcli.cli import main

main()
