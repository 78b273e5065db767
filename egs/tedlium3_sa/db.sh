# Where the corpus lives on this machine or cluster: the directory holding TEDLIUM_release-3/
# (legacy/{train,dev,test}/{sph,stm}). Empty: the recipe synthesises an offline demo corpus in the
# same layout.
TEDLIUM3=${TEDLIUM3:-}
