from teachx.interfaces.cli import main

main()
