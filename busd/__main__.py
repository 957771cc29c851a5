from busd.cli.main import main

main()
