from teachx.cli.main import main

main()
