"""Editing methods. Importing this package registers every built-in method (see registry.py).

The import order is the order ``lmpatch methods`` lists them in.
"""
# isort: skip_file
from lmpatch.methods import rome  # noqa: F401 - each module registers its methods
from lmpatch.methods import memit  # noqa: F401
from lmpatch.methods import alphaedit  # noqa: F401
from lmpatch.methods import pmet  # noqa: F401
from lmpatch.methods import emmet  # noqa: F401
from lmpatch.methods import kn  # noqa: F401
from lmpatch.methods import ft  # noqa: F401
from lmpatch.methods import ft_generic  # noqa: F401
from lmpatch.methods import grace  # noqa: F401
from lmpatch.methods import wise  # noqa: F401
from lmpatch.methods import tpatcher  # noqa: F401
from lmpatch.methods import calinet  # noqa: F401
from lmpatch.methods import ike  # noqa: F401
from lmpatch.methods import memprompt  # noqa: F401
from lmpatch.methods import serac  # noqa: F401
from lmpatch.methods import mello  # noqa: F401
from lmpatch.methods import mend  # noqa: F401
from lmpatch.methods import ke  # noqa: F401
from lmpatch.methods import depn  # noqa: F401
from lmpatch.methods import dinm  # noqa: F401
from lmpatch.methods import promote  # noqa: F401
from lmpatch.methods import dama  # noqa: F401
from lmpatch.methods import lsdm  # noqa: F401
from lmpatch.methods import ultraedit  # noqa: F401
