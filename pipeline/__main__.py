from medxfer.cli import main

main()
