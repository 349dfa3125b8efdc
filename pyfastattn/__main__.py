from pyfastattn.info import main

main()
